"""tasklet's tables, declared once as SQLAlchemy Core metadata.

This module is the single truth for the schema: the Alembic migrations in
``alembic/`` must produce exactly these tables (a test compares them on SQLite
and on PostgreSQL). Applications may import :data:`metadata` to reference the
tables, or to keep Alembic autogenerate away from them.

Job states::

    queued --claim--> running --> succeeded | failed | cancelled
       ^                 |
       +-- retry, rescue, release (shutdown) --+

A ``queued`` job whose ``run_at`` lies in the future is a scheduled job.
"""

from __future__ import annotations

from typing import Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

__all__ = [
    "JOB_STATUSES",
    "RUN_OUTCOMES",
    "job_runs",
    "jobs",
    "metadata",
    "paused_queues",
    "schedule_ticks",
    "workers",
]

JOB_STATUSES: Final = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES: Final = ("succeeded", "failed", "cancelled")
RUN_OUTCOMES: Final = (
    "succeeded",
    "failed",
    "timed_out",
    "lost",
    "interrupted",
    "cancelled",
    "snoozed",
)
SERIALIZERS: Final = ("json", "pickle")

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only aliases the rowid (cheap, monotonic ids) for a column typed exactly INTEGER.
_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# none_as_null: a Python None is SQL NULL (not the JSON text "null"), as the CHECKs expect.
_Json = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
_Time = sa.DateTime(timezone=True)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _one_of(column: str, values: tuple[str, ...]) -> str:
    """:func:`_in` written with OR, for SQLite's CHECKs on jobs: SQLite builds a temporary
    index of an IN list for every row it writes (migration 0005)."""
    return " OR ".join(f"{column} = {v!r}" for v in values)


jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", _Id, primary_key=True, autoincrement=True),
    sa.Column("name", sa.Text(), nullable=False),
    sa.Column("queue", sa.Text(), nullable=False),
    sa.Column("priority", sa.Integer(), nullable=False),
    sa.Column("status", sa.Text(), nullable=False),
    sa.Column("serializer", sa.Text(), nullable=False),
    # JSON arguments stay readable in the database; pickled ones are opaque bytes.
    sa.Column("args", _Json, nullable=True),
    sa.Column("args_pickle", sa.LargeBinary(), nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("max_attempts", sa.Integer(), nullable=False),
    # Attempts lost with a crashed worker; bounded so a job that kills workers stops.
    sa.Column("lost_count", sa.Integer(), nullable=False),
    sa.Column("timeout", sa.Float(), nullable=True),
    sa.Column("run_at", _Time, nullable=False),
    sa.Column("created_at", _Time, nullable=False),
    sa.Column("started_at", _Time, nullable=True),
    sa.Column("finished_at", _Time, nullable=True),
    sa.Column("locked_by", sa.Text(), nullable=True),
    # Fencing token: bumped by every claim; a finish must present the one it was handed.
    sa.Column("lease", sa.Integer(), nullable=False),
    sa.Column("last_error", sa.Text(), nullable=True),
    # While a job with this key is queued or running, deferring another returns it instead.
    sa.Column("unique_key", sa.Text(), nullable=True),
    # At most concurrency_limit jobs with the same key run at once, across every worker.
    sa.Column("concurrency_key", sa.Text(), nullable=True),
    sa.Column("concurrency_limit", sa.Integer(), nullable=True),
    # Set by cancel() on a running job: its worker stops it and it is not retried.
    sa.Column("cancel_requested_at", _Time, nullable=True),
    # The W3C trace context of the defer (JSON: traceparent, tracestate) while tracing is on.
    sa.Column("trace_context", sa.Text(), nullable=True),
    # CHECKs on SQLite only: PostgreSQL compiles every CHECK afresh for each INSERT
    # or UPDATE statement, and they were most of a one-row enqueue's server time
    # (migrations 0003 and 0004). tasklet writes these values itself; the worker
    # refuses a serializer or payload it does not know (Job.decode), and the test
    # suite checks the two state invariants on PostgreSQL after every test.
    *(
        check.ddl_if(dialect="sqlite")
        for check in (
            sa.CheckConstraint("status <> 'running' OR locked_by IS NOT NULL", name="running_held"),
            sa.CheckConstraint(
                f"NOT ({_one_of('status', TERMINAL_STATUSES)}) OR finished_at IS NOT NULL",
                name="terminal_finished",
            ),
            sa.CheckConstraint(_one_of("status", JOB_STATUSES), name="status"),
            sa.CheckConstraint(_one_of("serializer", SERIALIZERS), name="serializer"),
            sa.CheckConstraint(
                "(serializer = 'json' AND args IS NOT NULL AND args_pickle IS NULL)"
                " OR (serializer = 'pickle' AND args_pickle IS NOT NULL AND args IS NULL)",
                name="payload",
            ),
            sa.CheckConstraint(
                "attempts >= 0 AND max_attempts >= 1 AND lost_count >= 0", name="counts"
            ),
        )
    ),
)

# The claim path: due queued jobs of some queues, by priority, then due time, then id.
# Jobs under a concurrency limit are left out (they have an index of their own), so
# a backlog of limited jobs never stands in the way of a claim.
_UNLIMITED_QUEUED = sa.and_(jobs.c.status == "queued", jobs.c.concurrency_key.is_(None))
_LIMITED_QUEUED = sa.and_(jobs.c.status == "queued", jobs.c.concurrency_key.is_not(None))
sa.Index(
    None,
    jobs.c.queue,
    jobs.c.priority,
    jobs.c.run_at,
    jobs.c.id,
    postgresql_where=_UNLIMITED_QUEUED,
    sqlite_where=_UNLIMITED_QUEUED,
)
# The limited claim path: queued jobs per concurrency key, in claim order.
sa.Index(
    None,
    jobs.c.concurrency_key,
    jobs.c.priority,
    jobs.c.run_at,
    jobs.c.id,
    postgresql_where=_LIMITED_QUEUED,
    sqlite_where=_LIMITED_QUEUED,
)
# How many jobs of a concurrency key run now.
_LIMITED_RUNNING = sa.and_(jobs.c.status == "running", jobs.c.concurrency_key.is_not(None))
sa.Index(
    None,
    jobs.c.concurrency_key,
    postgresql_where=_LIMITED_RUNNING,
    sqlite_where=_LIMITED_RUNNING,
)
# Unique jobs: one queued or running job per key, enforced by the database.
_UNIQUE_ACTIVE = sa.and_(jobs.c.unique_key.is_not(None), jobs.c.status.in_(("queued", "running")))
sa.Index(
    None,
    jobs.c.unique_key,
    unique=True,
    postgresql_where=_UNIQUE_ACTIVE,
    sqlite_where=_UNIQUE_ACTIVE,
)
# Retention: finished jobs by status and age, deleted oldest first in small batches.
sa.Index(
    None,
    jobs.c.status,
    jobs.c.finished_at,
    postgresql_where=jobs.c.finished_at.is_not(None),
    sqlite_where=jobs.c.finished_at.is_not(None),
)
# The rescue path: running jobs by holder.
sa.Index(
    None,
    jobs.c.locked_by,
    postgresql_where=jobs.c.status == "running",
    sqlite_where=jobs.c.status == "running",
)

job_runs = sa.Table(
    "job_runs",
    metadata,
    sa.Column("id", _Id, primary_key=True, autoincrement=True),
    sa.Column("job_id", _Id, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("worker_id", sa.Text(), nullable=True),
    sa.Column("outcome", sa.Text(), nullable=False),
    sa.Column("started_at", _Time, nullable=True),
    sa.Column("finished_at", _Time, nullable=False),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("traceback", sa.Text(), nullable=True),
    sa.Column("result", _Json, nullable=True),
    sa.CheckConstraint(_in("outcome", RUN_OUTCOMES), name="outcome"),
)
sa.Index(None, job_runs.c.job_id, job_runs.c.attempt)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.Text(), primary_key=True),
    sa.Column("host", sa.Text(), nullable=False),
    sa.Column("pid", sa.Integer(), nullable=False),
    sa.Column("queues", _Json, nullable=False),
    sa.Column("concurrency", sa.Integer(), nullable=False),
    sa.Column("started_at", _Time, nullable=False),
    sa.Column("heartbeat_at", _Time, nullable=False),
)
sa.Index(None, workers.c.heartbeat_at)

# A paused queue keeps accepting jobs, but no worker starts them until it is resumed.
paused_queues = sa.Table(
    "paused_queues",
    metadata,
    sa.Column("queue", sa.Text(), primary_key=True),
    sa.Column("paused_at", _Time, nullable=False),
)

# Each tick of a recurring schedule is enqueued once, however many workers schedule:
# the primary key refuses a second row for the same (schedule, tick).
schedule_ticks = sa.Table(
    "schedule_ticks",
    metadata,
    sa.Column("schedule", sa.Text(), primary_key=True),
    sa.Column("tick", _Time, primary_key=True),
    # Not a foreign key: retention deletes the job, the record of the tick stays.
    sa.Column("job_id", _Id, nullable=True),
    sa.Column("created_at", _Time, nullable=False),
)

#: Alembic keeps tasklet's migration history here, apart from the application's own.
VERSION_TABLE: Final = "tasklet_alembic_version"
TABLE_NAMES: Final = frozenset(metadata.tables)
