"""jobs, job_runs and workers

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
Time = sa.DateTime(timezone=True)
QUEUED = sa.text("status = 'queued'")
RUNNING = sa.text("status = 'running'")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("serializer", sa.Text(), nullable=False),
        sa.Column("args", Json, nullable=True),
        sa.Column("args_pickle", sa.LargeBinary(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("lost_count", sa.Integer(), nullable=False),
        sa.Column("timeout", sa.Float(), nullable=True),
        sa.Column("run_at", Time, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("started_at", Time, nullable=True),
        sa.Column("finished_at", Time, nullable=True),
        sa.Column("locked_by", sa.Text(), nullable=True),
        sa.Column("lease", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
            name=op.f("ck_jobs_status"),
        ),
        sa.CheckConstraint("serializer IN ('json', 'pickle')", name=op.f("ck_jobs_serializer")),
        sa.CheckConstraint(
            "(serializer = 'json' AND args IS NOT NULL AND args_pickle IS NULL)"
            " OR (serializer = 'pickle' AND args_pickle IS NOT NULL AND args IS NULL)",
            name=op.f("ck_jobs_payload"),
        ),
        sa.CheckConstraint(
            "attempts >= 0 AND max_attempts >= 1 AND lost_count >= 0", name=op.f("ck_jobs_counts")
        ),
        sa.CheckConstraint(
            "status <> 'running' OR locked_by IS NOT NULL", name=op.f("ck_jobs_running_held")
        ),
        sa.CheckConstraint(
            "NOT (status IN ('succeeded', 'failed', 'cancelled')) OR finished_at IS NOT NULL",
            name=op.f("ck_jobs_terminal_finished"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(
        op.f("ix_jobs_queue_priority_run_at_id"),
        "jobs",
        ["queue", "priority", "run_at", "id"],
        postgresql_where=QUEUED,
        sqlite_where=QUEUED,
    )
    op.create_index(
        op.f("ix_jobs_locked_by"),
        "jobs",
        ["locked_by"],
        postgresql_where=RUNNING,
        sqlite_where=RUNNING,
    )

    op.create_table(
        "job_runs",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("job_id", Id, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.Text(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("started_at", Time, nullable=True),
        sa.Column("finished_at", Time, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("result", Json, nullable=True),
        sa.CheckConstraint(
            "outcome IN ('succeeded', 'failed', 'timed_out', 'lost', 'interrupted',"
            " 'cancelled', 'snoozed')",
            name=op.f("ck_job_runs_outcome"),
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_runs_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_runs")),
    )
    op.create_index(op.f("ix_job_runs_job_id_attempt"), "job_runs", ["job_id", "attempt"])

    op.create_table(
        "workers",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("queues", Json, nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("started_at", Time, nullable=False),
        sa.Column("heartbeat_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    op.create_index(op.f("ix_workers_heartbeat_at"), "workers", ["heartbeat_at"])


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_table("job_runs")
    op.drop_table("jobs")
