"""Every SQL statement tasklet runs, as named operations (noun_verb) on a :class:`Database`.

The worker, the CLI and the public API call these and never build SQL of their
own. Dialect differences stay inside this module. Each operation is written
once, synchronously; async callers run it in a worker thread.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Connection

from ._database import Database
from .schema import job_runs, jobs, workers

UTC = dt.UTC


def utcnow() -> dt.datetime:
    return dt.datetime.now(UTC)


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands timestamps back naive; tasklet stores them in UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class NewJob:
    """A row to insert into ``jobs``: when it is due is ``run_at``, or ``delay_s`` from now."""

    name: str
    queue: str
    priority: int
    max_attempts: int
    timeout: float | None
    serializer: str
    args: dict[str, Any] | None
    args_pickle: bytes | None
    run_at: dt.datetime | None = None
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class JobRow:
    """One row of ``jobs`` as tasklet reads it back."""

    id: int
    name: str
    queue: str
    priority: int
    status: str
    serializer: str
    args: dict[str, Any] | None
    args_pickle: bytes | None
    attempts: int
    max_attempts: int
    lost_count: int
    timeout: float | None
    run_at: dt.datetime
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    locked_by: str | None
    lease: int
    last_error: str | None

    @classmethod
    def from_mapping(cls, row: sa.RowMapping) -> JobRow:
        values = dict(row)
        for key in ("run_at", "created_at", "started_at", "finished_at"):
            values[key] = as_utc(values[key])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class RunRow:
    """One row of ``job_runs``: the record of one attempt."""

    id: int
    job_id: int
    attempt: int
    worker_id: str | None
    outcome: str
    started_at: dt.datetime | None
    finished_at: dt.datetime
    error: str | None
    traceback: str | None
    result: Any

    @classmethod
    def from_mapping(cls, row: sa.RowMapping) -> RunRow:
        values = dict(row)
        for key in ("started_at", "finished_at"):
            values[key] = as_utc(values[key])
        return cls(**values)


# ---------------------------------------------------------------- statements

_INSERT_COLUMNS = (
    ("name", sa.Text()),
    ("queue", sa.Text()),
    ("priority", sa.Integer()),
    ("max_attempts", sa.Integer()),
    ("timeout", sa.Float()),
    ("serializer", sa.Text()),
    ("args", sa.Text()),
    ("args_pickle", sa.LargeBinary()),
    ("run_at", sa.DateTime(timezone=True)),
    ("delay_s", sa.Float()),
)


def _pg_insert_statement() -> sa.Select[Any]:
    """One round trip for any number of jobs: unnest parallel arrays, insert, notify.

    ``pg_notify`` runs in the inserting transaction, so workers hear of the jobs
    only once it commits; PostgreSQL folds identical notifications into one.
    """
    arrays = [
        sa.cast(sa.bindparam(f"{name}_list"), pg.ARRAY(type_)) for name, type_ in _INSERT_COLUMNS
    ]
    rows = sa.func.unnest(*arrays).table_valued(*(n for n, _ in _INSERT_COLUMNS)).render_derived()
    now = sa.func.now()
    source = sa.select(
        rows.c.name,
        rows.c.queue,
        rows.c.priority,
        sa.literal("queued"),
        rows.c.serializer,
        sa.cast(rows.c.args, pg.JSONB),
        rows.c.args_pickle,
        sa.literal(0),
        rows.c.max_attempts,
        sa.literal(0),
        rows.c.timeout,
        sa.func.coalesce(rows.c.run_at, now + rows.c.delay_s * sa.text("interval '1 second'")),
        now,
        sa.literal(0),
    )
    inserted = (
        sa.insert(jobs)
        .from_select(
            [
                "name",
                "queue",
                "priority",
                "status",
                "serializer",
                "args",
                "args_pickle",
                "attempts",
                "max_attempts",
                "lost_count",
                "timeout",
                "run_at",
                "created_at",
                "lease",
            ],
            source,
        )
        .returning(jobs.c.id, jobs.c.queue)
        .cte("inserted")
    )
    return sa.select(
        inserted.c.id, sa.func.pg_notify(sa.bindparam("channel"), inserted.c.queue)
    ).order_by(inserted.c.id)


_PG_INSERT = _pg_insert_statement()
# Rows are written in the order given and each takes the next rowid, under the write
# lock: ascending ids are the input order (asking SQLAlchemy to sort would cost a
# statement per row).
_SQLITE_INSERT = sa.insert(jobs).returning(jobs.c.id)


def _json_text(args: dict[str, Any] | None) -> str | None:
    return None if args is None else json.dumps(args, separators=(",", ":"))


def jobs_insert(
    db: Database, new_jobs: Sequence[NewJob], conn: Connection | None = None
) -> list[int]:
    """Insert jobs in one statement and return their ids in the order given.

    With ``conn`` the rows join the caller's transaction (they exist only if it
    commits); otherwise they are committed before this returns.
    """
    if not new_jobs:
        return []
    if conn is not None:
        with db.translate_errors():
            return _jobs_insert_on(db, conn, new_jobs)
    with db.autocommit() as own:
        return _jobs_insert_on(db, own, new_jobs)


def _jobs_insert_on(db: Database, conn: Connection, new_jobs: Sequence[NewJob]) -> list[int]:
    options = db.execution_options
    if conn.dialect.name == "postgresql":
        params: dict[str, Any] = {
            f"{name}_list": [getattr(j, name) for j in new_jobs] for name, _ in _INSERT_COLUMNS
        }
        params["args_list"] = [_json_text(j.args) for j in new_jobs]
        params["channel"] = db.notify_channel
        result = conn.execute(_PG_INSERT, params, execution_options=options)
        return [row[0] for row in result]
    now = utcnow()
    rows = [
        {
            "name": j.name,
            "queue": j.queue,
            "priority": j.priority,
            "status": "queued",
            "serializer": j.serializer,
            "args": j.args,
            "args_pickle": j.args_pickle,
            "attempts": 0,
            "max_attempts": j.max_attempts,
            "lost_count": 0,
            "timeout": j.timeout,
            "run_at": _sqlite_time(j.run_at or now + dt.timedelta(seconds=j.delay_s)),
            "created_at": _sqlite_time(now),
            "lease": 0,
        }
        for j in new_jobs
    ]
    result = conn.execute(_SQLITE_INSERT, rows, execution_options=options)
    return sorted(row[0] for row in result)


def _sqlite_time(value: dt.datetime) -> dt.datetime:
    """SQLite compares timestamps as text, so every stored one is naive UTC."""
    return value.astimezone(UTC).replace(tzinfo=None)


def job_get(db: Database, job_id: int) -> JobRow | None:
    with db.begin(read_only=True) as conn:
        row = (
            conn.execute(
                sa.select(jobs).where(jobs.c.id == job_id), execution_options=db.execution_options
            )
            .mappings()
            .first()
        )
    return None if row is None else JobRow.from_mapping(row)


def jobs_list(db: Database, *, queue: str | None = None, status: str | None = None) -> list[JobRow]:
    query = sa.select(jobs).order_by(jobs.c.id)
    if queue is not None:
        query = query.where(jobs.c.queue == queue)
    if status is not None:
        query = query.where(jobs.c.status == status)
    with db.begin(read_only=True) as conn:
        rows = conn.execute(query, execution_options=db.execution_options).mappings().all()
    return [JobRow.from_mapping(r) for r in rows]


def job_runs_list(db: Database, job_id: int) -> list[RunRow]:
    query = sa.select(job_runs).where(job_runs.c.job_id == job_id).order_by(job_runs.c.id)
    with db.begin(read_only=True) as conn:
        rows = conn.execute(query, execution_options=db.execution_options).mappings().all()
    return [RunRow.from_mapping(r) for r in rows]


# ------------------------------------------------------------------ the worker


def _now(conn: Connection) -> sa.ColumnElement[dt.datetime]:
    """The database's clock on PostgreSQL (one clock for every machine); the process's on SQLite."""
    if conn.dialect.name == "postgresql":
        return sa.func.now()
    return sa.literal(_sqlite_time(utcnow()), sa.DateTime())


def _ago(conn: Connection, seconds: float) -> sa.ColumnElement[dt.datetime]:
    if conn.dialect.name == "postgresql":
        return sa.func.now() - sa.literal(dt.timedelta(seconds=seconds), sa.Interval())
    return sa.literal(_sqlite_time(utcnow() - dt.timedelta(seconds=seconds)), sa.DateTime())


def _stamp(conn: Connection, value: dt.datetime | None) -> dt.datetime | None:
    """A timestamp as this database stores it (SQLite: naive UTC text)."""
    if value is None or conn.dialect.name == "postgresql":
        return value
    return _sqlite_time(value)


def _in_queues(queues: Sequence[str] | None) -> sa.ColumnElement[bool]:
    return sa.true() if not queues else jobs.c.queue.in_(queues)


def jobs_claim(
    db: Database,
    *,
    worker_id: str,
    queues: Sequence[str] | None,
    names: Sequence[str],
    limit: int,
) -> list[JobRow]:
    """Take up to ``limit`` due jobs of known ``names``: by priority, then due time, then id.

    Each claim bumps the job's ``lease``: the fencing token its finish must present.
    """
    if limit <= 0 or not names:
        return []
    with db.begin() as conn:
        if conn.dialect.name == "postgresql":
            # A claim lost in a server crash only puts the job back in the queue, and its
            # finish is then refused by the lease check: no need to wait for the disk.
            conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
        now = _now(conn)
        due = (
            sa.select(jobs.c.id)
            .where(
                jobs.c.status == "queued",
                _in_queues(queues),
                jobs.c.name.in_(names),
                jobs.c.run_at <= now,
            )
            .order_by(jobs.c.priority, jobs.c.run_at, jobs.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        claim = (
            sa.update(jobs)
            .where(jobs.c.id.in_(due.scalar_subquery()))
            .values(
                status="running",
                attempts=jobs.c.attempts + 1,
                locked_by=worker_id,
                started_at=now,
                lease=jobs.c.lease + 1,
            )
            .returning(*jobs.c)
        )
        rows = conn.execute(claim, execution_options=db.execution_options).mappings().all()
    claimed = [JobRow.from_mapping(r) for r in rows]
    claimed.sort(key=lambda j: (j.priority, j.run_at, j.id))
    return claimed


@dataclass(frozen=True, slots=True)
class Completion:
    """How one attempt ended, and what becomes of its job.

    ``status`` is the job's next state; a ``queued`` job is due ``delay_s`` from
    now. ``refund`` gives the attempt back (shutdown, never started).
    ``record`` writes the attempt to ``job_runs``.
    """

    job_id: int
    lease: int
    attempt: int
    worker_id: str
    status: str
    outcome: str
    started_at: dt.datetime | None
    finished_at: dt.datetime
    delay_s: float = 0.0
    refund: bool = False
    record: bool = True
    error: str | None = None
    traceback: str | None = None
    result: Any = None


_FINISH_COLUMNS = (
    ("job_id", sa.BigInteger()),
    ("lease", sa.Integer()),
    ("attempt", sa.Integer()),
    ("worker_id", sa.Text()),
    ("status", sa.Text()),
    ("outcome", sa.Text()),
    ("started_at", sa.DateTime(timezone=True)),
    ("finished_at", sa.DateTime(timezone=True)),
    ("delay_s", sa.Float()),
    ("refund", sa.Integer()),
    ("record", sa.Boolean()),
    ("error", sa.Text()),
    ("traceback", sa.Text()),
    ("result", sa.Text()),
)

_TERMINAL = ("succeeded", "failed", "cancelled")


def _pg_finish_statement() -> sa.Select[Any]:
    """One round trip per batch: fenced job updates, and a run row for each that applied."""
    arrays = [
        sa.cast(sa.bindparam(f"{name}_list"), pg.ARRAY(type_)) for name, type_ in _FINISH_COLUMNS
    ]
    given = sa.select(
        sa.func.unnest(*arrays).table_valued(*(n for n, _ in _FINISH_COLUMNS)).render_derived()
    ).cte("given")
    updated = (
        sa.update(jobs)
        .where(
            jobs.c.id == given.c.job_id,
            jobs.c.lease == given.c.lease,
            jobs.c.status == "running",
        )
        .values(
            status=given.c.status,
            run_at=sa.case(
                (
                    given.c.status == "queued",
                    sa.func.now() + given.c.delay_s * sa.text("interval '1 second'"),
                ),
                else_=jobs.c.run_at,
            ),
            finished_at=sa.case((given.c.status.in_(_TERMINAL), given.c.finished_at)),
            locked_by=None,
            attempts=jobs.c.attempts - given.c.refund,
            last_error=given.c.error,
        )
        .returning(jobs.c.id)
        .cte("updated")
    )
    recorded = (
        sa.select(
            given.c.job_id,
            given.c.attempt,
            given.c.worker_id,
            given.c.outcome,
            given.c.started_at,
            given.c.finished_at,
            given.c.error,
            given.c.traceback,
            sa.cast(given.c.result, pg.JSONB),
        )
        .join(updated, updated.c.id == given.c.job_id)
        .where(given.c.record)
    )
    inserted = (
        sa.insert(job_runs)
        .from_select(
            [
                "job_id",
                "attempt",
                "worker_id",
                "outcome",
                "started_at",
                "finished_at",
                "error",
                "traceback",
                "result",
            ],
            recorded,
        )
        .cte("inserted")
    )
    return sa.select(updated.c.id).add_cte(given, updated, inserted)


_PG_FINISH = _pg_finish_statement()


def jobs_finish(db: Database, completions: Sequence[Completion]) -> set[int]:
    """Apply a batch of completions in one transaction; returns the ids that applied.

    A completion applies only while the job is still ``running`` under the
    lease it was claimed with; a worker presumed dead that comes back changes
    nothing. Runs are recorded only for completions that applied.
    """
    if not completions:
        return set()
    with db.begin() as conn:
        if conn.dialect.name == "postgresql":
            return _pg_finish(db, conn, completions)
        return _sqlite_finish(db, conn, completions)


def _pg_finish(db: Database, conn: Connection, completions: Sequence[Completion]) -> set[int]:
    params: dict[str, Any] = {
        f"{name}_list": [getattr(c, name) for c in completions] for name, _ in _FINISH_COLUMNS
    }
    params["refund_list"] = [int(c.refund) for c in completions]
    params["result_list"] = [_result_text(c.result) for c in completions]
    return set(conn.execute(_PG_FINISH, params, execution_options=db.execution_options).scalars())


def _result_text(result: Any) -> str | None:
    return None if result is None else json.dumps(result, separators=(",", ":"))


def _sqlite_finish(db: Database, conn: Connection, completions: Sequence[Completion]) -> set[int]:
    applied: set[int] = set()
    now = utcnow()
    for c in completions:
        values: dict[str, Any] = {
            "status": c.status,
            "locked_by": None,
            "last_error": c.error,
            "attempts": jobs.c.attempts - int(c.refund),
            "finished_at": _sqlite_time(c.finished_at) if c.status in _TERMINAL else None,
        }
        if c.status == "queued":
            values["run_at"] = _sqlite_time(now + dt.timedelta(seconds=c.delay_s))
        update = (
            sa.update(jobs)
            .where(jobs.c.id == c.job_id, jobs.c.lease == c.lease, jobs.c.status == "running")
            .values(**values)
        )
        if conn.execute(update, execution_options=db.execution_options).rowcount:
            applied.add(c.job_id)
    runs = [_run_values(conn, c) for c in completions if c.record and c.job_id in applied]
    if runs:
        conn.execute(sa.insert(job_runs), runs, execution_options=db.execution_options)
    return applied


def _run_values(conn: Connection, c: Completion) -> dict[str, Any]:
    return {
        "job_id": c.job_id,
        "attempt": c.attempt,
        "worker_id": c.worker_id,
        "outcome": c.outcome,
        "started_at": _stamp(conn, c.started_at),
        "finished_at": _stamp(conn, c.finished_at),
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
        now = _now(conn)
        live = sa.select(workers.c.id).where(workers.c.heartbeat_at >= _ago(conn, lost_after_s))
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
                finished_at=sa.case((gives_up, now)),
                lost_count=jobs.c.lost_count + 1,
                locked_by=None,
                run_at=now,
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
        forget = sa.delete(workers).where(workers.c.heartbeat_at < _ago(conn, lost_after_s))
        conn.execute(forget, execution_options=options)
    return lost


def worker_register(
    db: Database, *, worker_id: str, host: str, pid: int, queues: Sequence[str], concurrency: int
) -> None:
    with db.begin() as conn:
        now = _now(conn)
        conn.execute(
            sa.insert(workers).values(
                id=worker_id,
                host=host,
                pid=pid,
                queues=list(queues),
                concurrency=concurrency,
                started_at=now,
                heartbeat_at=now,
            ),
            execution_options=db.execution_options,
        )


def worker_heartbeat(db: Database, worker_id: str) -> bool:
    """Refresh the worker's heartbeat; False if its row is gone (it was presumed dead)."""
    with db.begin() as conn:
        beat = sa.update(workers).where(workers.c.id == worker_id).values(heartbeat_at=_now(conn))
        return bool(conn.execute(beat, execution_options=db.execution_options).rowcount)


def worker_unregister(db: Database, worker_id: str) -> None:
    with db.begin() as conn:
        conn.execute(
            sa.delete(workers).where(workers.c.id == worker_id),
            execution_options=db.execution_options,
        )


def jobs_flag_unknown(
    db: Database,
    *,
    queues: Sequence[str] | None,
    known: Sequence[str],
    message: Callable[[str], str],
) -> list[str]:
    """Mark due jobs that no job type here can run, so they do not wait in silence.

    The jobs stay queued for a worker that knows them; ``last_error`` says why
    they wait (``message(name)``). Returns the names newly flagged.
    """
    with db.begin() as conn:
        unknown = (
            sa.select(jobs.c.name)
            .where(
                jobs.c.status == "queued",
                _in_queues(queues),
                jobs.c.name.not_in(known),
                jobs.c.run_at <= _now(conn),
            )
            .distinct()
            .limit(100)
        )
        names = list(conn.execute(unknown, execution_options=db.execution_options).scalars())
        flagged = []
        for name in names:
            text = message(name)
            flag = (
                sa.update(jobs)
                .where(
                    jobs.c.status == "queued",
                    jobs.c.name == name,
                    sa.or_(jobs.c.last_error.is_(None), jobs.c.last_error != text),
                )
                .values(last_error=text)
            )
            if conn.execute(flag, execution_options=db.execution_options).rowcount:
                flagged.append(name)
    return flagged


def jobs_next_due(
    db: Database, *, queues: Sequence[str] | None, names: Sequence[str]
) -> dt.datetime | None:
    """When the earliest queued job of these queues and names is due, or None if there is none."""
    query = sa.select(sa.func.min(jobs.c.run_at)).where(
        jobs.c.status == "queued", _in_queues(queues), jobs.c.name.in_(names)
    )
    with db.begin(read_only=True) as conn:
        value = conn.execute(query, execution_options=db.execution_options).scalar()
    if isinstance(value, str):  # SQLite's min() returns the stored text
        value = dt.datetime.fromisoformat(value)
    return as_utc(value)


def jobs_clear(db: Database, *, queues: Sequence[str] | None) -> int:
    """Delete queued jobs (of these queues, or all); running and finished ones are kept."""
    with db.begin() as conn:
        delete = sa.delete(jobs).where(jobs.c.status == "queued", _in_queues(queues))
        return conn.execute(delete, execution_options=db.execution_options).rowcount


def jobs_count(db: Database, *, queues: Sequence[str] | None = None) -> dict[str, int]:
    """Jobs per status (of these queues, or all)."""
    query = (
        sa.select(jobs.c.status, sa.func.count()).where(_in_queues(queues)).group_by(jobs.c.status)
    )
    with db.begin(read_only=True) as conn:
        rows = conn.execute(query, execution_options=db.execution_options).all()
    return {status: count for status, count in rows}
