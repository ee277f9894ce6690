"""Making queued jobs due now: what ``tasklet.testing.drain`` does instead of waiting."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from .._database import Database
from ..schema import jobs
from ._sql import in_queues, now


def jobs_make_due(
    db: Database, *, queues: Sequence[str] | None, names: Sequence[str], retries_only: bool
) -> int:
    """Move the due time of queued jobs that wait for later to now; returns how many moved.

    ``retries_only`` moves only jobs that waited for a retry's backoff (they have
    had an attempt), not jobs deferred for later.
    """
    if not names:
        return 0
    with db.begin() as conn:
        current = now(conn)
        update = (
            sa.update(jobs)
            .where(
                jobs.c.status == "queued",
                in_queues(queues),
                jobs.c.name.in_(names),
                jobs.c.run_at > current,
                jobs.c.attempts > 0 if retries_only else sa.true(),
            )
            .values(run_at=current)
        )
        return conn.execute(update, execution_options=db.execution_options).rowcount
