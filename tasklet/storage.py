"""Every SQL statement tasklet runs, as named operations (noun_verb) on a :class:`Database`.

The worker, the CLI and the public API call these and never build SQL of their
own. Dialect differences stay inside this module. Each operation is written
once, synchronously; async callers run it in a worker thread.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Connection

from ._database import Database
from .schema import job_runs, jobs

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
_SQLITE_INSERT = sa.insert(jobs).returning(jobs.c.id, sort_by_parameter_order=True)


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
    return [row[0] for row in result]


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
