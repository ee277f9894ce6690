"""What the web dashboard reads and changes: queue counts, throughput, job pages, actions.

Every read here is shaped to stay on an index when ``jobs`` holds millions of
finished rows: counts of live jobs go through the partial indexes the claim and
rescue paths already keep, finished jobs are counted over a time window on
``ix_jobs_status_finished_at``, and job lists page by id (keyset), never by offset.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .._database import Database
from ..errors import TaskletError
from ..schema import jobs, paused_queues, workers
from ._sql import now, stamp
from .rows import as_utc, utcnow

#: The statuses a job list filters on; ``queued`` is due now, ``scheduled`` due later.
LIST_STATUSES: Final = ("queued", "scheduled", "running", "succeeded", "failed", "cancelled")
RETRYABLE: Final = ("failed", "cancelled")
_ERROR_PREVIEW = 300


@dataclass(slots=True)
class QueueCounts:
    """One queue's jobs by state; ``succeeded`` counts the last ``window`` only."""

    queue: str
    queued: int = 0
    scheduled: int = 0
    running: int = 0
    failed: int = 0
    succeeded: int = 0
    paused_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Throughput:
    """Jobs finished per bucket and queue: ``series[queue][i]`` covers ``start + i * bucket``."""

    start: dt.datetime
    bucket: dt.timedelta
    series: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class JobSummary:
    """A row of a job list: no arguments, and the start of the last error only."""

    id: int
    name: str
    queue: str
    status: str
    priority: int
    attempts: int
    max_attempts: int
    run_at: dt.datetime
    created_at: dt.datetime
    finished_at: dt.datetime | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class JobsPage:
    """Newest first; ``has_older``/``has_newer`` say whether to link the next page."""

    jobs: list[JobSummary]
    has_older: bool
    has_newer: bool


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    id: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    running: int
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    heartbeat_age_s: float


def _clock(conn: Connection) -> dt.datetime:
    """The time the database's timestamps are compared with (see ``_sql.now``)."""
    if conn.dialect.name == "postgresql":
        value = conn.execute(sa.select(sa.func.now())).scalar_one()
        return as_utc(value) or utcnow()
    return utcnow()


def _select(conn: Connection, db: Database, query: sa.Executable) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in conn.execute(query, execution_options=db.execution_options)]


def dashboard_queues(db: Database, *, window: dt.timedelta) -> list[QueueCounts]:
    """Every queue with live, failed or recently succeeded jobs, or paused, with its counts."""
    with db.begin(read_only=True) as conn:
        current = now(conn)
        due = sa.case((jobs.c.run_at > current, "scheduled"), else_="queued").label("state")
        count = sa.func.count().label("n")
        parts = [
            # One branch per partial index (claim, limited claim, rescue, retention).
            sa.select(jobs.c.queue, due, count)
            .where(jobs.c.status == "queued", condition)
            .group_by(jobs.c.queue, "state")
            for condition in (jobs.c.concurrency_key.is_(None), jobs.c.concurrency_key.is_not(None))
        ]
        parts.append(
            sa.select(jobs.c.queue, sa.literal("running").label("state"), count)
            .where(jobs.c.status == "running")
            .group_by(jobs.c.queue)
        )
        parts.append(
            sa.select(jobs.c.queue, sa.literal("failed").label("state"), count)
            .where(jobs.c.status == "failed", jobs.c.finished_at.is_not(None))
            .group_by(jobs.c.queue)
        )
        since = stamp(conn, _clock(conn) - window)
        parts.append(
            sa.select(jobs.c.queue, sa.literal("succeeded").label("state"), count)
            .where(jobs.c.status == "succeeded", jobs.c.finished_at >= since)
            .group_by(jobs.c.queue)
        )
        rows = _select(conn, db, sa.union_all(*parts))
        paused = _select(conn, db, sa.select(paused_queues.c.queue, paused_queues.c.paused_at))
    queues: dict[str, QueueCounts] = {}
    for queue, state, n in rows:
        counts = queues.setdefault(queue, QueueCounts(queue))
        setattr(counts, state, getattr(counts, state) + n)
    for queue, paused_at in paused:
        queues.setdefault(queue, QueueCounts(queue)).paused_at = as_utc(paused_at)
    return sorted(queues.values(), key=lambda q: q.queue)


def _bucket_number(conn: Connection, seconds: int) -> sa.ColumnElement[Any]:
    if conn.dialect.name == "postgresql":
        epoch = sa.func.extract("epoch", jobs.c.finished_at)
        return sa.cast(sa.func.floor(epoch / seconds), sa.BigInteger)
    epoch_text = sa.func.strftime("%s", jobs.c.finished_at)
    return sa.cast(epoch_text, sa.Integer) / seconds


def dashboard_throughput(db: Database, *, buckets: int, bucket: dt.timedelta) -> Throughput:
    """Jobs that succeeded or failed per queue in each of the last ``buckets`` buckets."""
    seconds = int(bucket.total_seconds())
    with db.begin(read_only=True) as conn:
        current = _clock(conn)
        last = int(current.timestamp()) // seconds
        first = last - buckets + 1
        start = dt.datetime.fromtimestamp(first * seconds, dt.UTC)
        number = _bucket_number(conn, seconds).label("bucket")
        query = (
            sa.select(jobs.c.queue, number, sa.func.count())
            .where(
                jobs.c.status.in_(("succeeded", "failed")),  # on ix_jobs_status_finished_at
                jobs.c.finished_at >= stamp(conn, start),
            )
            .group_by(jobs.c.queue, "bucket")
        )
        rows = _select(conn, db, query)
    series: dict[str, list[int]] = {}
    for queue, number_, n in rows:
        index = int(number_) - first
        if 0 <= index < buckets:
            series.setdefault(queue, [0] * buckets)[index] += n
    return Throughput(start=start, bucket=bucket, series=dict(sorted(series.items())))


def _status_filter(conn: Connection, status: str) -> sa.ColumnElement[bool]:
    """The filter, spelled so PostgreSQL can use the partial indexes that hold those jobs."""
    if status in ("queued", "scheduled"):
        due = jobs.c.run_at <= now(conn) if status == "queued" else jobs.c.run_at > now(conn)
        # Queued jobs live in two partial indexes (claim, limited claim): one arm for each.
        return sa.or_(
            *(
                sa.and_(jobs.c.status == "queued", condition, due)
                for condition in (
                    jobs.c.concurrency_key.is_(None),
                    jobs.c.concurrency_key.is_not(None),
                )
            )
        )
    if status == "running":
        return jobs.c.status == "running"  # ix_jobs_locked_by
    # Always true of finished jobs (a CHECK); it lets ix_jobs_status_finished_at serve them.
    return sa.and_(jobs.c.status == status, jobs.c.finished_at.is_not(None))


_SUMMARY_COLUMNS = (
    jobs.c.id,
    jobs.c.name,
    jobs.c.queue,
    jobs.c.status,
    jobs.c.priority,
    jobs.c.attempts,
    jobs.c.max_attempts,
    jobs.c.run_at,
    jobs.c.created_at,
    jobs.c.finished_at,
    sa.func.substr(jobs.c.last_error, 1, _ERROR_PREVIEW).label("last_error"),
)


def dashboard_jobs_page(
    db: Database,
    *,
    queue: str | None = None,
    status: str | None = None,
    name: str | None = None,
    before: int | None = None,
    after: int | None = None,
    limit: int = 50,
) -> JobsPage:
    """A page of jobs, newest first: ids below ``before``, or the page above ``after``.

    Keyset pagination: each page is one walk down the primary key (or a status
    index) that stops after ``limit`` rows, however many jobs there are.
    """
    if status is not None and status not in LIST_STATUSES:
        raise TaskletError(f"unknown status {status!r}: use one of {', '.join(LIST_STATUSES)}")
    with db.begin(read_only=True) as conn:
        query = sa.select(*_SUMMARY_COLUMNS).limit(limit + 1)
        if queue is not None:
            query = query.where(jobs.c.queue == queue)
        if status is not None:
            query = query.where(_status_filter(conn, status))
        if name is not None:
            query = query.where(jobs.c.name == name)
        if after is not None:
            query = query.where(jobs.c.id > after).order_by(jobs.c.id.asc())
        else:
            if before is not None:
                query = query.where(jobs.c.id < before)
            query = query.order_by(jobs.c.id.desc())
        rows = conn.execute(query, execution_options=db.execution_options).mappings().all()
    more = len(rows) > limit
    found = [_summary(row) for row in rows[:limit]]
    if after is not None:
        return JobsPage(list(reversed(found)), has_older=True, has_newer=more)
    return JobsPage(found, has_older=more, has_newer=before is not None)


def _summary(row: sa.RowMapping) -> JobSummary:
    values = dict(row)
    for key in ("run_at", "created_at", "finished_at"):
        values[key] = as_utc(values[key])
    return JobSummary(**values)


def dashboard_workers(db: Database) -> list[WorkerInfo]:
    """Registered workers, oldest first, with how many jobs each holds now."""
    running = (
        sa.select(sa.func.count())
        .where(jobs.c.status == "running", jobs.c.locked_by == workers.c.id)  # ix_jobs_locked_by
        .scalar_subquery()
        .label("running")
    )
    with db.begin(read_only=True) as conn:
        current = _clock(conn)
        query = sa.select(workers, running).order_by(workers.c.started_at, workers.c.id)
        rows = conn.execute(query, execution_options=db.execution_options).mappings().all()
    found = []
    for row in rows:
        heartbeat = as_utc(row["heartbeat_at"]) or current
        values = {**row, "started_at": as_utc(row["started_at"]), "heartbeat_at": heartbeat}
        age = max(0.0, (current - heartbeat).total_seconds())
        found.append(WorkerInfo(**values, heartbeat_age_s=age))
    return found
