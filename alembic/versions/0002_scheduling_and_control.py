"""unique jobs, concurrency limits, cancel requests, paused queues, schedule ticks, retention

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)
QUEUED = "status = 'queued'"
UNLIMITED_QUEUED = sa.text("status = 'queued' AND concurrency_key IS NULL")
LIMITED_QUEUED = sa.text("status = 'queued' AND concurrency_key IS NOT NULL")
LIMITED_RUNNING = sa.text("status = 'running' AND concurrency_key IS NOT NULL")
UNIQUE_ACTIVE = sa.text("unique_key IS NOT NULL AND status IN ('queued', 'running')")
FINISHED = sa.text("finished_at IS NOT NULL")


def _partial(name: str, columns: list[str], where: sa.TextClause, unique: bool = False) -> None:
    op.create_index(
        op.f(name), "jobs", columns, unique=unique, postgresql_where=where, sqlite_where=where
    )


def upgrade() -> None:
    # Plain ADD COLUMNs: no table rebuild on SQLite, no rewrite on PostgreSQL (all NULL).
    op.add_column("jobs", sa.Column("unique_key", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("concurrency_key", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("concurrency_limit", sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("cancel_requested_at", Time, nullable=True))
    op.add_column("jobs", sa.Column("trace_context", sa.Text(), nullable=True))
    # The claim index now leaves limited jobs out: they have an index of their own.
    op.drop_index(op.f("ix_jobs_queue_priority_run_at_id"), table_name="jobs")
    _partial("ix_jobs_queue_priority_run_at_id", ["queue", "priority", "run_at", "id"],
             UNLIMITED_QUEUED)  # fmt: skip
    _partial(
        "ix_jobs_concurrency_key_priority_run_at_id",
        ["concurrency_key", "priority", "run_at", "id"],
        LIMITED_QUEUED,
    )
    _partial("ix_jobs_concurrency_key", ["concurrency_key"], LIMITED_RUNNING)
    _partial("ix_jobs_unique_key", ["unique_key"], UNIQUE_ACTIVE, unique=True)
    _partial("ix_jobs_status_finished_at", ["status", "finished_at"], FINISHED)

    op.create_table(
        "paused_queues",
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("paused_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("queue", name=op.f("pk_paused_queues")),
    )
    op.create_table(
        "schedule_ticks",
        sa.Column("schedule", sa.Text(), nullable=False),
        sa.Column("tick", Time, nullable=False),
        sa.Column("job_id", Id, nullable=True),
        sa.Column("created_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("schedule", "tick", name=op.f("pk_schedule_ticks")),
    )


def downgrade() -> None:
    op.drop_table("schedule_ticks")
    op.drop_table("paused_queues")
    for name in (
        "ix_jobs_status_finished_at",
        "ix_jobs_unique_key",
        "ix_jobs_concurrency_key",
        "ix_jobs_concurrency_key_priority_run_at_id",
        "ix_jobs_queue_priority_run_at_id",
    ):
        op.drop_index(op.f(name), table_name="jobs")
    for column in (
        "trace_context",
        "cancel_requested_at",
        "concurrency_limit",
        "concurrency_key",
        "unique_key",
    ):
        op.drop_column("jobs", column)
    _QUEUED = sa.text(QUEUED)
    op.create_index(
        op.f("ix_jobs_queue_priority_run_at_id"),
        "jobs",
        ["queue", "priority", "run_at", "id"],
        postgresql_where=_QUEUED,
        sqlite_where=_QUEUED,
    )
