"""Operations on jobs as the API and the CLI see them: enqueue, read, clear, count."""

from __future__ import annotations

import base64
import datetime as dt
import functools
from collections.abc import Callable, Sequence
from typing import Any

import anyio.to_thread
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .._codec import compact_json
from .._database import Database
from ..schema import job_runs, jobs, paused_queues
from ._sql import (
    OPTIONAL_COLUMNS,
    RowShape,
    in_queues,
    now,
    pg_insert_sql,
    pg_insert_unique_sql,
    sqlite_insert_sql,
)
from .rows import JobRow, NewJob, NewJobBatch, RunRow, as_utc, sqlite_text, sqlite_time, utcnow

# Rows are written in the order given and each takes the next rowid, under the write
# lock: ascending ids are the input order (asking SQLAlchemy to sort would cost a
# statement per row).
_SQLITE_INSERT = sa.insert(jobs).returning(jobs.c.id)


def _pg_insert(
    db: Database, conn: Connection | None, new_jobs: Sequence[NewJob], notify: bool
) -> list[int]:
    """Insert on ``conn``, or committing at once on a connection of tasklet's own (None)."""
    sql, params = _pg_insert_statement(db, new_jobs, notify)
    return _ids(db.driver_execute(conn, sql, params))


def _ids(rows: Sequence[Any]) -> list[int]:
    return [rows[0][0]] if len(rows) == 1 else sorted(row[0] for row in rows)


def _pg_insert_statement(
    db: Database, new_jobs: Sequence[NewJob], notify: bool, *, unique: bool = False
) -> tuple[str, dict[str, Any]]:
    """One round trip for any number of jobs (see ``_sql.pg_insert_sql``).

    ``unique`` builds the variant for jobs with unique keys (see storage/unique.py).
    """
    first = new_jobs[0]
    build = pg_insert_unique_sql if unique else pg_insert_sql
    shape: RowShape | None
    if len(new_jobs) == 1:
        shape, params = row_shape(first)
        if shape.serializer == "json":
            params["args"] = _json_text(first)
        same = False
    elif (args := _same_but_args_json(new_jobs)) is not None:
        shape, params = row_shape(first)  # defer_many: only the arguments differ
        params["args"] = args
        same = True
    else:
        shape, same = None, False
        params = {"rows": _pg_rows_json(new_jobs)}
    if notify:
        params["channel"] = db.notify_channel
    return build(db.schema, shape, same=same, notify=notify), params


async def jobs_insert_async(
    db: Database, new_jobs: Sequence[NewJob], *, notify: bool = True
) -> list[int]:
    """:func:`jobs_insert` committing at once, for async callers.

    On PostgreSQL with an engine tasklet made, the same statement runs on an
    async driver connection (no thread hop); otherwise in a worker thread.
    """
    if not new_jobs:
        return []
    if db.own_connections:
        sql, params = _pg_insert_statement(db, new_jobs, notify)
        return _ids(await db.driver_execute_async(sql, params))
    return await anyio.to_thread.run_sync(
        functools.partial(jobs_insert, db, new_jobs, notify=notify)
    )


def row_shape(job: NewJob) -> tuple[RowShape, dict[str, Any]]:
    """The statement shape a row takes, and the parameters it binds but its arguments.

    PostgreSQL takes a row due later as ``run_at`` or ``delay_s``; SQLite callers
    bind ``run_at`` (and ``now``) themselves.
    """
    params: dict[str, Any] = {
        "name": job.name,
        "queue": job.queue,
        "priority": job.priority,
        "max_attempts": job.max_attempts,
    }
    bound: tuple[str, ...] = ()
    # Most jobs set none of them (a limit comes with its key): one test, not five.
    if not (job.timeout is None and job.unique_key is None and job.concurrency_key is None):
        bound = tuple(c for c in OPTIONAL_COLUMNS if getattr(job, c) is not None)
    elif job.trace_context is not None:
        bound = ("trace_context",)
    for column in bound:
        params[column] = getattr(job, column)
    if job.run_at is not None:
        due = "at"
        params["run_at"] = job.run_at
    elif job.delay_s:
        due = "in"
        params["delay_s"] = job.delay_s
    else:
        due = "now"
    if job.serializer == "pickle":
        params["args_pickle"] = job.args_pickle
    return RowShape(job.serializer, due, bound), params


def sqlite_row_params(job: NewJob, now: dt.datetime) -> tuple[RowShape, dict[str, Any]]:
    """:func:`row_shape` with SQLite's timestamps (naive UTC text, the process's clock)."""
    shape, params = row_shape(job)
    params["now"] = sqlite_text(now)
    if shape.due != "now":
        params.pop("delay_s", None)
        params["run_at"] = sqlite_text(job.run_at or now + dt.timedelta(seconds=job.delay_s))
    return shape, params


def _same_but_args_json(new_jobs: Sequence[NewJob]) -> str | None:
    """The JSON array of the rows' arguments, if they differ in nothing else (one statement)."""
    if isinstance(new_jobs, NewJobBatch):
        return new_jobs.args_json
    first = new_jobs[0]
    if first.serializer == "json" and all(first.same_but_args(j) for j in new_jobs):
        return compact_json([j.args for j in new_jobs])
    return None


def _json_text(job: NewJob) -> str | None:
    if job.args is None:
        return None
    return job.args_json or compact_json(job.args)


def _pg_rows_json(new_jobs: Sequence[NewJob]) -> str:
    return compact_json(
        [
            {
                "name": j.name,
                "queue": j.queue,
                "priority": j.priority,
                "max_attempts": j.max_attempts,
                "timeout": j.timeout,
                "serializer": j.serializer,
                "args": j.args,
                "args_pickle": None
                if j.args_pickle is None
                else base64.b64encode(j.args_pickle).decode("ascii"),
                "run_at": None if j.run_at is None else j.run_at.isoformat(),
                "delay_s": j.delay_s,
                "unique_key": j.unique_key,
                "concurrency_key": j.concurrency_key,
                "concurrency_limit": j.concurrency_limit,
                "trace_context": j.trace_context,
            }
            for j in new_jobs
        ]
    )


def jobs_insert(
    db: Database,
    new_jobs: Sequence[NewJob],
    conn: Connection | None = None,
    *,
    notify: bool = True,
) -> list[int]:
    """Insert jobs in one statement and return their ids in the order given.

    With ``conn`` the rows join the caller's transaction (they exist only if it
    commits); otherwise they are committed before this returns. ``notify``
    sends PostgreSQL's wake-up to listening workers (see tasklet._wakeup).
    """
    if not new_jobs:
        return []
    if conn is not None:
        with db.translate_errors():
            return _jobs_insert_on(db, conn, new_jobs, notify)
    if db.own_connections:
        return _pg_insert(db, None, new_jobs, notify)
    with db.autocommit() as own:
        return _jobs_insert_on(db, own, new_jobs, notify)


def _jobs_insert_on(
    db: Database, conn: Connection, new_jobs: Sequence[NewJob], notify: bool
) -> list[int]:
    if conn.dialect.name == "postgresql":
        return _pg_insert(db, conn, new_jobs, notify)
    return _sqlite_insert(db, conn, new_jobs)


def _sqlite_insert(db: Database, conn: Connection, new_jobs: Sequence[NewJob]) -> list[int]:
    now = utcnow()
    first = new_jobs[0]
    same = len(new_jobs) > 1
    args = _same_but_args_json(new_jobs) if same else None
    if not same or args is not None:
        # One statement, even outside a transaction: atomic, and it takes the write
        # lock (waiting up to the busy timeout) only while it runs.
        shape, params = sqlite_row_params(first, now)
        if args is not None:
            params["args"] = args
        elif shape.serializer == "json":
            params["args"] = _json_text(first)
        sql = sqlite_insert_sql(shape, same=same)
        if not same:
            return [db.driver_execute(conn, sql, params, last_rowid=True)[0][0]]
        return sorted(row[0] for row in db.driver_execute(conn, sql, params))
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
            "run_at": sqlite_time(j.run_at or now + dt.timedelta(seconds=j.delay_s)),
            "created_at": sqlite_time(now),
            "lease": 0,
            "unique_key": j.unique_key,
            "concurrency_key": j.concurrency_key,
            "concurrency_limit": j.concurrency_limit,
            "trace_context": j.trace_context,
        }
        for j in new_jobs
    ]
    if not conn.in_transaction():
        with conn.begin():
            result = conn.execute(_SQLITE_INSERT, rows, execution_options=db.execution_options)
            return sorted(row[0] for row in result)
    result = conn.execute(_SQLITE_INSERT, rows, execution_options=db.execution_options)
    return sorted(row[0] for row in result)


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
                in_queues(queues),
                jobs.c.name.not_in(known),
                jobs.c.run_at <= now(conn),
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
    db: Database,
    *,
    queues: Sequence[str] | None,
    names: Sequence[str],
    limited: bool = False,
    lost_below: int | None = None,
) -> dt.datetime | None:
    """When the earliest queued job of these queues and names is due, or None if there is none.

    Jobs of paused queues are left out: a worker waits for the resume instead of
    claiming in vain. With ``limited``, jobs under a concurrency limit count
    only while they are scheduled for later: a due one that was not claimed
    waits for a running job of its key to finish, and that finish wakes the
    worker (``worker._flush_once``), so a worker never spins on a full key.
    ``lost_below`` leaves out what the claim left out (``Claimer.claim``).
    """
    unpaused = jobs.c.queue.not_in(sa.select(paused_queues.c.queue))
    mine: tuple[sa.ColumnElement[bool], ...] = (
        jobs.c.status == "queued",
        in_queues(queues),
        jobs.c.name.in_(names),
        unpaused,
    )
    if lost_below is not None:  # as the claim that found nothing left them out
        mine = (*mine, jobs.c.lost_count < lost_below)
    # On the claim index.
    query = sa.select(sa.func.min(jobs.c.run_at)).where(*mine, jobs.c.concurrency_key.is_(None))
    with db.begin(read_only=True) as conn:
        if limited:
            scheduled = sa.select(sa.func.min(jobs.c.run_at)).where(
                *mine, jobs.c.concurrency_key.is_not(None), jobs.c.run_at > now(conn)
            )
            both = sa.union_all(query, scheduled).subquery()
            query = sa.select(sa.func.min(both.c[0]))
        value = conn.execute(query, execution_options=db.execution_options).scalar()
    if isinstance(value, str):  # SQLite's min() returns the stored text
        value = dt.datetime.fromisoformat(value)
    return as_utc(value)


def jobs_clear(db: Database, *, queues: Sequence[str] | None) -> int:
    """Delete queued jobs (of these queues, or all); running and finished ones are kept."""
    with db.begin() as conn:
        delete = sa.delete(jobs).where(jobs.c.status == "queued", in_queues(queues))
        return conn.execute(delete, execution_options=db.execution_options).rowcount


def jobs_count(db: Database, *, queues: Sequence[str] | None = None) -> dict[str, int]:
    """Jobs per status (of these queues, or all)."""
    query = (
        sa.select(jobs.c.status, sa.func.count()).where(in_queues(queues)).group_by(jobs.c.status)
    )
    with db.begin(read_only=True) as conn:
        rows = conn.execute(query, execution_options=db.execution_options).all()
    return {status: count for status, count in rows}
