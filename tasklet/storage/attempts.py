"""The worker's operations: claim due jobs, finish attempts, rescue the jobs of dead workers.

On PostgreSQL each batch costs two round trips: one statement claims up to N
jobs, one statement finishes a batch of attempts and records their runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Connection

from .._database import Database
from ..schema import job_runs, jobs, workers
from ._sql import ago, in_queues, now, pg_claim_sql, pg_finish_sql, stamp
from .rows import ClaimedJob, Completion, JobRow, as_utc, sqlite_time, utcnow

_TERMINAL = ("succeeded", "failed", "cancelled")


class Claimer:
    """Claims jobs for one worker, on a connection it keeps (PostgreSQL) between claims.

    Each claim hands the job a new ``lease``: the fencing token its finish must
    present. On PostgreSQL the claim does not wait for the disk
    (``synchronous_commit = off``): a claim lost in a server crash only leaves
    the job queued, and the worker's finish is then refused by the lease check.
    """

    def __init__(
        self, db: Database, *, worker_id: str, queues: Sequence[str] | None, names: Sequence[str]
    ) -> None:
        self._db = db
        self._worker_id = worker_id
        self._queues = list(queues) if queues else None
        self._names = list(names)
        self._conn: Connection | None = None

    def claim(self, limit: int) -> list[ClaimedJob]:
        """Up to ``limit`` due jobs, by priority, then due time, then id."""
        if limit <= 0 or not self._names:
            return []
        if self._db.dialect == "sqlite":
            return self._claim_sqlite(limit)
        with self._db.translate_errors():
            try:
                rows = self._connection().exec_driver_sql(
                    pg_claim_sql(self._db.schema, self._queues is None),
                    {
                        "worker_id": self._worker_id,
                        "queues": self._queues,
                        "names": self._names,
                        "limit": limit,
                    },
                )
                claimed = [ClaimedJob(*row) for row in rows]
            except exc.DBAPIError:
                self.close()  # a fresh connection next time
                raise
        claimed.sort(key=lambda j: (j.priority, j.run_at, j.id))
        return claimed

    def _connection(self) -> Connection:
        if self._conn is None:
            conn = self._db.autocommit_engine.connect()
            conn.exec_driver_sql("SET synchronous_commit = off")
            self._conn = conn
        return self._conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(exc.DBAPIError):
            conn.exec_driver_sql("RESET synchronous_commit")
        conn.close()

    def _claim_sqlite(self, limit: int) -> list[ClaimedJob]:
        with self._db.begin() as conn:
            due = (
                sa.select(jobs.c.id)
                .where(
                    jobs.c.status == "queued",
                    in_queues(self._queues),
                    jobs.c.name.in_(self._names),
                    jobs.c.run_at <= now(conn),
                )
                .order_by(jobs.c.priority, jobs.c.run_at, jobs.c.id)
                .limit(limit)
            )
            claim = (
                sa.update(jobs)
                .where(jobs.c.id.in_(due.scalar_subquery()))
                .values(
                    status="running",
                    attempts=jobs.c.attempts + 1,
                    locked_by=self._worker_id,
                    started_at=now(conn),
                    lease=jobs.c.lease + 1,
                )
                .returning(*(jobs.c[name] for name in ClaimedJob.__slots__))
            )
            rows = conn.execute(claim, execution_options=self._db.execution_options).all()
        claimed = [_claimed(row) for row in rows]
        claimed.sort(key=lambda j: (j.priority, j.run_at, j.id))
        return claimed


def _claimed(row: sa.Row[Any]) -> ClaimedJob:
    values = list(row)
    values[10] = as_utc(values[10])  # run_at: SQLite hands it back naive
    return ClaimedJob(*values)


def jobs_claim(
    db: Database, *, worker_id: str, queues: Sequence[str] | None, names: Sequence[str], limit: int
) -> list[ClaimedJob]:
    """One claim on a connection of its own (a worker keeps a :class:`Claimer` instead)."""
    claimer = Claimer(db, worker_id=worker_id, queues=queues, names=names)
    try:
        return claimer.claim(limit)
    finally:
        claimer.close()


def jobs_finish(db: Database, completions: Sequence[Completion]) -> set[int]:
    """Apply a batch of completions atomically; returns the ids that applied.

    A completion applies only while the job is still ``running`` under the
    lease it was claimed with; a worker presumed dead that comes back changes
    nothing. Runs are recorded only for completions that applied.
    """
    if not completions:
        return set()
    if db.dialect == "postgresql":
        with db.autocommit() as conn:
            batch = json.dumps([_finish_row(c) for c in completions], separators=(",", ":"))
            rows = conn.exec_driver_sql(pg_finish_sql(db.schema), {"batch": batch})
            return {row[0] for row in rows}
    with db.begin() as conn:
        return _sqlite_finish(db, conn, completions)


def _finish_row(c: Completion) -> dict[str, Any]:
    return {
        "job_id": c.job_id,
        "lease": c.lease,
        "attempt": c.attempt,
        "worker_id": c.worker_id,
        "status": c.status,
        "outcome": c.outcome,
        "started_at": None if c.started_at is None else c.started_at.isoformat(),
        "finished_at": c.finished_at.isoformat(),
        "delay_s": c.delay_s,
        "refund": int(c.refund),
        "record": c.record,
        "error": c.error,
        "traceback": c.traceback,
        "result": c.result,
    }


# SQLite: one executemany per batch. The batch runs under the write lock, so the
# jobs found running under their leases are exactly those the update will change.
_SQLITE_FINISH = (
    sa.update(jobs)
    .where(jobs.c.id == sa.bindparam("b_id"))
    .values(
        status=sa.bindparam("b_status"),
        locked_by=None,
        last_error=sa.bindparam("b_error"),
        attempts=jobs.c.attempts - sa.bindparam("b_refund", type_=sa.Integer()),
        finished_at=sa.bindparam("b_finished_at", type_=sa.DateTime()),
        run_at=sa.func.coalesce(sa.bindparam("b_run_at", type_=sa.DateTime()), jobs.c.run_at),
    )
)


def _sqlite_finish(db: Database, conn: Connection, completions: Sequence[Completion]) -> set[int]:
    options = db.execution_options
    held = sa.select(jobs.c.id, jobs.c.lease).where(
        jobs.c.id.in_([c.job_id for c in completions]), jobs.c.status == "running"
    )
    leases: dict[int, int] = {
        job_id: lease for job_id, lease in conn.execute(held, execution_options=options)
    }
    applying = [c for c in completions if leases.get(c.job_id) == c.lease]
    if not applying:
        return set()
    current = utcnow()
    conn.execute(
        _SQLITE_FINISH,
        [
            {
                "b_id": c.job_id,
                "b_status": c.status,
                "b_error": c.error,
                "b_refund": int(c.refund),
                "b_finished_at": sqlite_time(c.finished_at) if c.status in _TERMINAL else None,
                "b_run_at": sqlite_time(current + dt.timedelta(seconds=c.delay_s))
                if c.status == "queued"
                else None,
            }
            for c in applying
        ],
        execution_options=options,
    )
    runs = [_run_values(conn, c) for c in applying if c.record]
    if runs:
        conn.execute(sa.insert(job_runs), runs, execution_options=options)
    return {c.job_id for c in applying}


def _run_values(conn: Connection, c: Completion) -> dict[str, Any]:
    return {
        "job_id": c.job_id,
        "attempt": c.attempt,
        "worker_id": c.worker_id,
        "outcome": c.outcome,
        "started_at": stamp(conn, c.started_at),
        "finished_at": stamp(conn, c.finished_at),
        "error": c.error,
        "traceback": c.traceback,
        "result": c.result,
    }


def jobs_rescue(db: Database, *, lost_after_s: float, max_lost: int) -> list[JobRow]:
    """Put back the running jobs of workers that stopped heartbeating; returns them as they were.

    Each rescued attempt is recorded as ``lost``. A job lost ``max_lost`` times,
    or on its last attempt, is failed instead: a job that keeps killing its
    worker must not crash-loop the fleet. Safe to run from many workers at once:
    each lost row is locked (and skipped by the other sweepers) while it is rescued.
    """
    options = db.execution_options
    with db.begin() as conn:
        current = now(conn)
        live = sa.select(workers.c.id).where(workers.c.heartbeat_at >= ago(conn, lost_after_s))
        lost_query = (
            sa.select(jobs)
            .where(jobs.c.status == "running", jobs.c.locked_by.not_in(live.scalar_subquery()))
            .with_for_update(skip_locked=True)
        )
        rows = conn.execute(lost_query, execution_options=options).mappings().all()
        lost = [JobRow.from_mapping(r) for r in rows]
        if not lost:
            return []
        gives_up = sa.or_(jobs.c.lost_count + 1 >= max_lost, jobs.c.attempts >= jobs.c.max_attempts)
        rescue = (
            sa.update(jobs)
            .where(jobs.c.id.in_([j.id for j in lost]), jobs.c.status == "running")
            .values(
                status=sa.case((gives_up, "failed"), else_="queued"),
                finished_at=sa.case((gives_up, current)),
                lost_count=jobs.c.lost_count + 1,
                locked_by=None,
                run_at=current,
                last_error=sa.literal("lost: worker ") + jobs.c.locked_by + " stopped heartbeating",
            )
        )
        conn.execute(rescue, execution_options=options)
        finished = utcnow()
        runs = [
            _run_values(
                conn,
                Completion(
                    job_id=j.id,
                    lease=j.lease,
                    attempt=j.attempts,
                    worker_id=j.locked_by or "",
                    status="queued",
                    outcome="lost",
                    started_at=j.started_at,
                    finished_at=finished,
                    error=f"lost: worker {j.locked_by} stopped heartbeating",
                ),
            )
            for j in lost
        ]
        conn.execute(sa.insert(job_runs), runs, execution_options=options)
        forget = sa.delete(workers).where(workers.c.heartbeat_at < ago(conn, lost_after_s))
        conn.execute(forget, execution_options=options)
    return lost
