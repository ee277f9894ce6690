"""PostgreSQL: check the state invariants in tasklet's tests, not per statement

PostgreSQL compiles a table's CHECK expressions afresh for every INSERT or
UPDATE statement (migration 0003). The two state invariants left after 0003 (a
running job has a holder, a terminal job has finished_at) cost a one-row
enqueue about 11 µs of server time, 5% of its commit-bound round trip. Every
statement that changes a job's state is tasklet's own (storage/), and the test
suite checks both invariants on every table its tests leave behind, on both
databases. SQLite compiles CHECKs once per prepared statement, so it keeps them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATE_CHECKS = {
    "ck_jobs_running_held": "status <> 'running' OR locked_by IS NOT NULL",
    "ck_jobs_terminal_finished": (
        "NOT (status IN ('succeeded', 'failed', 'cancelled')) OR finished_at IS NOT NULL"
    ),
}


def _postgresql() -> bool:
    return bool(op.get_context().dialect.name == "postgresql")


def upgrade() -> None:
    if _postgresql():
        for name in STATE_CHECKS:
            op.drop_constraint(op.f(name), "jobs", type_="check")


def downgrade() -> None:
    if _postgresql():
        for name, condition in STATE_CHECKS.items():
            op.create_check_constraint(op.f(name), "jobs", sa.text(condition))
