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
from ._sql import SQLITE_INSERTS, in_queues, now, pg_insert_sql, pg_insert_unique_sql
from .rows import JobRow, NewJob, RunRow, as_utc, sqlite_text, sqlite_time, utcnow

# Rows are written in the order given and each takes the next rowid, under the write
# lock: ascending ids are the input order (asking SQLAlchemy to sort would cost a
# statement per row).
_SQLITE_INSERT = sa.insert(jobs).returning(jobs.c.id)


def _pg_insert(
    db: Database, conn: Connection, new_jobs: Sequence[NewJob], notify: bool
) -> list[int]:
    sql, params = _pg_insert_statement(db, new_jobs, notify)
    return sorted(row[0] for row in db.driver_execute(conn, sql, params))


def _pg_insert_statement(
    db: Database, new_jobs: Sequence[NewJob], notify: bool, *, unique: bool = False
) -> tuple[str, dict[str, Any]]:
    """One round trip for any number of jobs (see ``_sql.pg_insert_sql``).

    ``unique`` builds the variant for jobs with unique keys (see storage/unique.py).
    """
    first = new_jobs[0]
    params = {
        **_shared_params(first),
        "run_at": first.run_at,
        "delay_s": first.delay_s,
        "channel": db.notify_channel,
    }
    if len(new_jobs) == 1:
        shape = "one"
        params["args"] = _json_text(first)
        params["args_pickle"] = first.args_pickle
    elif first.serializer == "json" and all(first.same_but_args(j) for j in new_jobs):
        shape = "same"  # defer_many: only the arguments differ
        params["args"] = compact_json([j.args for j in new_jobs])
    else:
        shape = "many"
        params = {"rows": _pg_rows_json(new_jobs), "channel": db.notify_channel}
    build = pg_insert_unique_sql if unique else pg_insert_sql
    return build(db.schema, shape=shape, notify=notify), params


async def jobs_insert_async(
    db: Database, new_jobs: Sequence[NewJob], *, notify: bool = True
) -> list[int]:
    """:func:`jobs_insert` committing at once, for async callers.

    On PostgreSQL with an engine tasklet made, the same statement runs on an
    async driver connection (no thread hop); otherwise in a worker thread.
    """
    if not new_jobs:
        return []
    if db.native_async:
        sql, params = _pg_insert_statement(db, new_jobs, notify)
        return sorted(row[0] for row in await db.driver_execute_async(sql, params))
    return await anyio.to_thread.run_sync(
        functools.partial(jobs_insert, db, new_jobs, notify=notify)
    )


def _shared_params(job: NewJob) -> dict[str, Any]:
    """The columns a single-row or same-but-arguments insert binds once."""
    return {
        "name": job.name,
        "queue": job.queue,
        "priority": job.priority,
        "serializer": job.serializer,
        "max_attempts": job.max_attempts,
        "timeout": job.timeout,
        "unique_key": job.unique_key,
        "concurrency_key": job.concurrency_key,
        "concurrency_limit": job.concurrency_limit,
        "trace_context": job.trace_context,
    }


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
    if first.serializer == "json" and all(first.same_but_args(j) for j in new_jobs):
        # One statement, even outside a transaction: atomic, and it takes the write
        # lock (waiting up to the busy timeout) only while it runs.
        params = _shared_params(first)
        params["now"] = sqlite_text(now)
        run_at = first.run_at or now + dt.timedelta(seconds=first.delay_s)
        params["run_at"] = params["now"] if run_at == now else sqlite_text(run_at)
        if len(new_jobs) == 1:
            shape, params["args"], params["args_pickle"] = "one", _json_text(first), None
        else:
            shape = "same"
            params["args"] = compact_json([j.args for j in new_jobs])
        return sorted(row[0] for row in db.driver_execute(conn, SQLITE_INSERTS[shape], params))
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
    db: Database, *, queues: Sequence[str] | None, names: Sequence[str], limited: bool = False
) -> dt.datetime | None:
    """When the earliest queued job of these queues and names is due, or None if there is none.

    Jobs of paused queues are left out: a worker waits for the resume instead of
    claiming in vain. With ``limited``, jobs under a concurrency limit count
    only while they are scheduled for later: a due one that was not claimed
    waits for a running job of its key to finish, and that finish wakes the
    worker (``worker._flush_once``), so a worker never spins on a full key.
    """
    unpaused = jobs.c.queue.not_in(sa.select(paused_queues.c.queue))
    mine = (jobs.c.status == "queued", in_queues(queues), jobs.c.name.in_(names), unpaused)
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
