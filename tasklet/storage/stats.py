"""How much work each queue holds now: for metrics and status displays."""

from __future__ import annotations

from collections import defaultdict

import sqlalchemy as sa

from .._database import Database
from ..schema import jobs
from ._sql import now


def queue_depths(db: Database) -> dict[str, dict[str, int]]:
    """Per queue: jobs ``due`` now, ``scheduled`` for later, and ``running``.

    Each count reads one of the partial indexes (unlimited queued, limited queued,
    running), so a million finished jobs in the table cost nothing here.
    """
    depths: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(_STATES, 0))
    with db.begin(read_only=True) as conn:
        current = now(conn)
        for limited in (False, True):
            key = jobs.c.concurrency_key
            queued = sa.and_(
                jobs.c.status == "queued", key.is_not(None) if limited else key.is_(None)
            )
            state = sa.case((jobs.c.run_at <= current, "due"), else_="scheduled")
            query = (
                sa.select(jobs.c.queue, state, sa.func.count())
                .where(queued)
                .group_by(jobs.c.queue, state)
            )
            for queue, name, count in conn.execute(query, execution_options=db.execution_options):
                depths[queue][name] += count
        running = (
            sa.select(jobs.c.queue, sa.func.count())
            .where(jobs.c.status == "running")
            .group_by(jobs.c.queue)
        )
        for queue, count in conn.execute(running, execution_options=db.execution_options):
            depths[queue]["running"] += count
    return dict(depths)


_STATES = ("due", "scheduled", "running")
