"""Operations on queues: pause, resume, and what each queue holds.

A paused queue keeps accepting jobs; the claim statements leave its jobs out
(see ``_sql``), so no worker starts them until it is resumed. Jobs already
running finish as usual.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from .._database import Database
from ..schema import jobs, paused_queues
from ._sql import now
from .rows import as_utc


@dataclass(frozen=True, slots=True)
class QueueRow:
    """A queue that holds queued or running jobs, or is paused."""

    name: str
    queued: int
    running: int
    #: When the queue was paused, or None when it runs.
    paused_at: dt.datetime | None


def queue_pause(db: Database, queue: str) -> bool:
    """Pause ``queue``; False if it was already paused (its pause time is kept)."""
    with db.begin() as conn:
        insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        statement = (
            insert(paused_queues)
            .values(queue=queue, paused_at=now(conn))
            .on_conflict_do_nothing(index_elements=["queue"])
            .returning(paused_queues.c.queue)
        )
        return conn.execute(statement, execution_options=db.execution_options).first() is not None


def queue_resume(db: Database, queue: str) -> bool:
    """Resume ``queue``; False if it was not paused.

    On PostgreSQL the workers hear of it at once: the queue's name is sent on
    the wake-up channel when the transaction commits, as an enqueue does.
    """
    with db.begin() as conn:
        delete = sa.delete(paused_queues).where(paused_queues.c.queue == queue)
        resumed = conn.execute(delete, execution_options=db.execution_options).rowcount == 1
        if resumed and conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_notify(db.notify_channel, queue)))
    return resumed


def queues_paused(db: Database) -> dict[str, dt.datetime]:
    """Paused queues by name, with the time each was paused."""
    query = sa.select(paused_queues.c.queue, paused_queues.c.paused_at).order_by(
        paused_queues.c.queue
    )
    with db.begin(read_only=True) as conn:
        rows = conn.execute(query, execution_options=db.execution_options).all()
    return {queue: _aware(paused_at) for queue, paused_at in rows}


def queues_list(db: Database) -> list[QueueRow]:
    """Queues with queued or running jobs, and paused queues, by name."""
    active = sa.select(jobs.c.queue, jobs.c.status, sa.func.count().label("n")).where(
        jobs.c.status.in_(("queued", "running"))
    )
    with db.begin(read_only=True) as conn:
        counts = conn.execute(
            active.group_by(jobs.c.queue, jobs.c.status), execution_options=db.execution_options
        ).all()
        paused = dict(
            conn.execute(
                sa.select(paused_queues.c.queue, paused_queues.c.paused_at),
                execution_options=db.execution_options,
            ).all()
        )
    per_queue: dict[str, dict[str, int]] = {name: {} for name in paused}
    for queue, status, n in counts:
        per_queue.setdefault(queue, {})[status] = n
    return [
        QueueRow(
            name=name,
            queued=statuses.get("queued", 0),
            running=statuses.get("running", 0),
            paused_at=_aware(paused[name]) if name in paused else None,
        )
        for name, statuses in sorted(per_queue.items())
    ]


def _aware(value: dt.datetime) -> dt.datetime:
    aware = as_utc(value)
    assert aware is not None
    return aware
