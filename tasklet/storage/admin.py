"""What operators read and change from the admin CLI: queue status, job pages, retries, workers.

Every read here is served by an index, so it stays fast beside millions of
finished jobs: queued jobs by the two claim indexes, running ones by the rescue
index, finished ones by the retention index ``(status, finished_at)``, and
pages of jobs by the primary key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Connection

from .._database import Database
from ..schema import TERMINAL_STATUSES, jobs, paused_queues, workers
from ._sql import ago, in_queues, now
from .rows import JobRow, as_utc, utcnow

#: Jobs a retry of many updates per transaction (SQLite's write lock is held meanwhile).
RETRY_BATCH = 500


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """One queue as ``tasklet status`` shows it."""

    queue: str
    queued: int = 0  # due now
    scheduled: int = 0  # due later
    running: int = 0
    failed: int = 0
    oldest_due_at: dt.datetime | None = None  # the longest-waiting due job's run_at
    paused_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """A live worker: one row of ``workers`` whose heartbeat is recent."""

    id: str
    host: str
    pid: int
    queues: tuple[str, ...]  # empty: every queue
    concurrency: int
    started_at: dt.datetime
    heartbeat_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state of every queue and worker, read in one transaction, with the database's clock."""

    queues: list[QueueCounts]
    workers: list[WorkerRow]
    now: dt.datetime


def _clock(conn: Connection) -> dt.datetime:
    if conn.dialect.name == "postgresql":
        value = conn.execute(sa.select(sa.func.now())).scalar_one()
        assert isinstance(value, dt.datetime)
        return value.astimezone(dt.UTC)
    return utcnow()


def _time(value: Any) -> dt.datetime | None:
    if isinstance(value, str):  # SQLite's min() returns the stored text
        value = dt.datetime.fromisoformat(value)
    return as_utc(value)


def status_snapshot(db: Database, *, lost_after_s: float) -> Snapshot:
    """Jobs per queue and state, paused queues, and workers heard from within ``lost_after_s``."""
    options = db.execution_options
    counts: dict[str, dict[str, Any]] = {}

    def row(queue: str) -> dict[str, Any]:
        return counts.setdefault(queue, {"queue": queue})

    with db.begin(read_only=True) as conn:
        current = _clock(conn)
        due = jobs.c.run_at <= now(conn)
        # Queued jobs, in two queries so each reads only its own partial claim index.
        for limited in (jobs.c.concurrency_key.is_(None), jobs.c.concurrency_key.is_not(None)):
            queued = (
                sa.select(
                    jobs.c.queue,
                    sa.func.sum(sa.case((due, 1), else_=0)),
                    sa.func.sum(sa.case((due, 0), else_=1)),
                    sa.func.min(sa.case((due, jobs.c.run_at))),
                )
                .where(jobs.c.status == "queued", limited)
                .group_by(jobs.c.queue)
            )
            for queue, now_n, later_n, oldest in conn.execute(queued, execution_options=options):
                entry = row(queue)
                entry["queued"] = entry.get("queued", 0) + int(now_n)
                entry["scheduled"] = entry.get("scheduled", 0) + int(later_n)
                oldest = _time(oldest)
                if oldest is not None and (
                    entry.get("oldest_due_at") is None or oldest < entry["oldest_due_at"]
                ):
                    entry["oldest_due_at"] = oldest
        running = (
            sa.select(jobs.c.queue, sa.func.count())
            .where(jobs.c.status == "running")
            .group_by(jobs.c.queue)
        )
        for queue, n in conn.execute(running, execution_options=options):
            row(queue)["running"] = n
        failed = (
            sa.select(jobs.c.queue, sa.func.count())
            .where(jobs.c.status == "failed", jobs.c.finished_at.is_not(None))  # retention index
            .group_by(jobs.c.queue)
        )
        for queue, n in conn.execute(failed, execution_options=options):
            row(queue)["failed"] = n
        for queue, paused_at in conn.execute(
            sa.select(paused_queues.c.queue, paused_queues.c.paused_at), execution_options=options
        ):
            row(queue)["paused_at"] = as_utc(paused_at)
        alive = _alive_workers(conn, db, lost_after_s)
    return Snapshot(
        queues=[QueueCounts(**counts[q]) for q in sorted(counts)], workers=alive, now=current
    )


def _alive_workers(conn: Connection, db: Database, lost_after_s: float) -> list[WorkerRow]:
    query = (
        sa.select(workers)
        .where(workers.c.heartbeat_at >= ago(conn, lost_after_s))
        .order_by(workers.c.started_at, workers.c.id)
    )
    rows = conn.execute(query, execution_options=db.execution_options).mappings().all()
    return [
        WorkerRow(
            id=r["id"],
            host=r["host"],
            pid=r["pid"],
            queues=tuple(r["queues"] or ()),
            concurrency=r["concurrency"],
            started_at=as_utc(r["started_at"]) or utcnow(),
            heartbeat_at=as_utc(r["heartbeat_at"]) or utcnow(),
        )
        for r in rows
    ]


def workers_alive(db: Database, *, lost_after_s: float) -> tuple[list[WorkerRow], dt.datetime]:
    """Workers heard from within ``lost_after_s``, oldest first, and the database's clock."""
    with db.begin(read_only=True) as conn:
        return _alive_workers(conn, db, lost_after_s), _clock(conn)


def jobs_page(
    db: Database,
    *,
    queue: str | None = None,
    status: str | None = None,
    name: str | None = None,
    limit: int = 50,
    before: int | None = None,
) -> list[JobRow]:
    """A page of jobs, newest first: the ``limit`` that follow job ``before`` in that order.

    Newest is the highest id; for a finished status it is the latest finished,
    read from the retention index, so that a few failed jobs are found at once
    among millions of succeeded ones.
    """
    query = sa.select(jobs).where(jobs.c.queue == queue if queue is not None else sa.true())
    if name is not None:
        query = query.where(jobs.c.name == name)
    if status in TERMINAL_STATUSES:
        query = query.where(jobs.c.status == status, jobs.c.finished_at.is_not(None))
        if before is not None:  # the jobs that come after job ``before`` in this order
            anchor = jobs.alias("anchor")
            of_anchor = sa.select(anchor.c.finished_at).where(anchor.c.id == before)
            finished = of_anchor.scalar_subquery()
            query = query.where(
                sa.or_(
                    jobs.c.finished_at < finished,
                    sa.and_(jobs.c.finished_at == finished, jobs.c.id < before),
                )
            )
        query = query.order_by(jobs.c.finished_at.desc(), jobs.c.id.desc())
        return _page(db, query, limit)
    if before is not None:
        query = query.where(jobs.c.id < before)
    if status == "running":
        # Few rows, on the rescue index; ordering by a bare id would walk the primary key.
        query = query.where(jobs.c.status == status).order_by((jobs.c.id + 0).desc())
    else:
        if status is not None:
            query = query.where(jobs.c.status == status)
        query = query.order_by(jobs.c.id.desc())
    return _page(db, query, limit)


def _page(db: Database, query: sa.Select[Any], limit: int) -> list[JobRow]:
    with db.begin(read_only=True) as conn:
        rows = conn.execute(query.limit(limit), execution_options=db.execution_options)
        return [JobRow.from_mapping(r) for r in rows.mappings()]


@dataclass(frozen=True, slots=True)
class RetryOutcome:
    """What a retry did: the jobs put back (id, queue), and those it left alone and why."""

    retried: list[tuple[int, str]]
    skipped: dict[int, str]


def _retry_values(conn: Connection) -> dict[str, Any]:
    # attempts keep counting (job_runs numbers stay unique per job); max_attempts grows
    # when needed, so the job gets at least one more attempt; the crash budget starts over.
    return {
        "status": "queued",
        "run_at": now(conn),
        "finished_at": None,
        "locked_by": None,
        "cancel_requested_at": None,
        "lost_count": 0,
        "max_attempts": sa.case(
            (jobs.c.attempts >= jobs.c.max_attempts, jobs.c.attempts + 1),
            else_=jobs.c.max_attempts,
        ),
    }


def _notify(conn: Connection, db: Database, queues: set[str]) -> None:
    """Wake PostgreSQL workers as enqueue does: one NOTIFY per queue, sent at commit."""
    if conn.dialect.name != "postgresql":
        return
    for queue in sorted(queues):
        conn.execute(sa.select(sa.func.pg_notify(db.notify_channel, queue)))


def jobs_retry(
    db: Database,
    *,
    ids: Sequence[int] = (),
    all_failed: bool = False,
    queues: Sequence[str] | None = None,
) -> RetryOutcome:
    """Put failed or cancelled jobs back in the queue, due now; queued and running jobs stay.

    ``ids``: these jobs (failed or cancelled). ``all_failed``: every failed job
    (of ``queues``), in transactions of :data:`RETRY_BATCH` jobs, each job at most once.
    A job whose unique key is held by a queued or running job is skipped.
    """
    retried: list[tuple[int, str]] = []
    skipped: dict[int, str] = {}
    if ids:
        for start in range(0, len(ids), RETRY_BATCH):
            chunk = list(ids[start : start + RETRY_BATCH])
            _retry_batch(db, chunk, ("failed", "cancelled"), retried, skipped)
    if all_failed:
        # The ids first (the retention index has them), then the updates by primary key:
        # each job is retried at most once, even if it fails again meanwhile.
        with db.begin(read_only=True) as conn:
            query = sa.select(jobs.c.id).where(
                jobs.c.status == "failed", jobs.c.finished_at.is_not(None), in_queues(queues)
            )
            found = conn.execute(query, execution_options=db.execution_options)
            failed = sorted(found.scalars())
        for start in range(0, len(failed), RETRY_BATCH):
            _retry_batch(db, failed[start : start + RETRY_BATCH], ("failed",), retried, skipped)
    return RetryOutcome(retried=retried, skipped=skipped)


def _retry_batch(
    db: Database,
    ids: list[int],
    statuses: tuple[str, ...],
    retried: list[tuple[int, str]],
    skipped: dict[int, str],
) -> None:
    options = db.execution_options
    with db.begin() as conn:
        found = {
            r.id: r
            for r in conn.execute(
                sa.select(jobs.c.id, jobs.c.status, jobs.c.queue, jobs.c.unique_key).where(
                    jobs.c.id.in_(ids)
                ),
                execution_options=options,
            )
        }
        plain: list[int] = []
        unique: list[int] = []
        for job_id in ids:
            found_row = found.get(job_id)
            if found_row is None:
                skipped[job_id] = "no such job"
            elif found_row.status not in statuses:
                skipped[job_id] = f"it is {found_row.status}"
            else:
                (unique if found_row.unique_key is not None else plain).append(job_id)
        done: list[tuple[int, str]] = []
        if plain:
            update = (
                sa.update(jobs)
                .where(jobs.c.id.in_(plain), jobs.c.status.in_(statuses))
                .values(**_retry_values(conn))
                .returning(jobs.c.id, jobs.c.queue)
            )
            done.extend((i, q) for i, q in conn.execute(update, execution_options=options))
        for job_id in unique:
            # The unique index admits one queued or running job per key: one at a time,
            # each in a savepoint, so a held key skips that job and keeps the others.
            update = (
                sa.update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status.in_(statuses))
                .values(**_retry_values(conn))
                .returning(jobs.c.id, jobs.c.queue)
            )
            try:
                with conn.begin_nested():
                    done.extend((i, q) for i, q in conn.execute(update, execution_options=options))
            except exc.IntegrityError:
                skipped[job_id] = "its unique key is held by a queued or running job"
        _notify(conn, db, {q for _, q in done})
    retried.extend(sorted(done))


def jobs_due_count(db: Database, *, queues: Sequence[str] | None, names: Sequence[str]) -> int:
    """Queued jobs due now that a worker of these queues and job names would run.

    Jobs of paused queues are left out: no worker starts them until the queue resumes.
    """
    with db.begin(read_only=True) as conn:
        total = 0
        paused = sa.select(paused_queues.c.queue)
        for limited in (jobs.c.concurrency_key.is_(None), jobs.c.concurrency_key.is_not(None)):
            query = sa.select(sa.func.count()).where(
                jobs.c.status == "queued",
                limited,
                in_queues(queues),
                jobs.c.name.in_(names),
                jobs.c.run_at <= now(conn),
                jobs.c.queue.not_in(paused.scalar_subquery()),
            )
            total += int(conn.execute(query, execution_options=db.execution_options).scalar_one())
        return total


__all__ = [
    "QueueCounts",
    "RetryOutcome",
    "Snapshot",
    "WorkerRow",
    "jobs_due_count",
    "jobs_page",
    "jobs_retry",
    "status_snapshot",
    "workers_alive",
]
