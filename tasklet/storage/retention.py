"""Retention: deleting finished jobs (and, by cascade, their runs) once they are old enough.

Each call deletes one small batch of one status, oldest first, and commits: a
batch is a short transaction, so retention never holds up claims or finishes.
The batch is found on ``ix_jobs_status_finished_at``; on PostgreSQL its rows
are locked with ``SKIP LOCKED``, so workers that prune at the same time take
different rows instead of waiting for each other.
"""

from __future__ import annotations

import sqlalchemy as sa

from .._database import Database
from ..schema import TERMINAL_STATUSES, jobs
from ._sql import ago


def jobs_prune(db: Database, *, status: str, older_than_s: float, limit: int) -> int:
    """Delete up to ``limit`` jobs of ``status`` that finished over ``older_than_s`` ago.

    Their ``job_runs`` rows go with them (``ON DELETE CASCADE``). Returns how
    many jobs were deleted: fewer than ``limit`` means none of them are left.
    """
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"only finished jobs are pruned ({', '.join(TERMINAL_STATUSES)})")
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit!r}")
    with db.begin() as conn:
        oldest = (
            sa.select(jobs.c.id)
            .where(
                jobs.c.status == status,
                jobs.c.finished_at.is_not(None),  # the retention index is partial on this
                jobs.c.finished_at < ago(conn, older_than_s),
            )
            .order_by(jobs.c.finished_at)
            .limit(limit)
            .with_for_update(skip_locked=True)  # SQLite has one writer: nothing to skip
        )
        delete = sa.delete(jobs).where(jobs.c.id.in_(oldest.scalar_subquery()))
        return int(conn.execute(delete, execution_options=db.execution_options).rowcount)
