"""The workers table: who is alive, and since when."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from .._database import Database
from ..schema import workers
from ._sql import now


def worker_register(
    db: Database, *, worker_id: str, host: str, pid: int, queues: Sequence[str], concurrency: int
) -> None:
    with db.begin() as conn:
        current = now(conn)
        conn.execute(
            sa.insert(workers).values(
                id=worker_id,
                host=host,
                pid=pid,
                queues=list(queues),
                concurrency=concurrency,
                started_at=current,
                heartbeat_at=current,
            ),
            execution_options=db.execution_options,
        )


def worker_heartbeat(db: Database, worker_id: str) -> bool:
    """Refresh the worker's heartbeat; False if its row is gone (it was presumed dead)."""
    with db.begin() as conn:
        beat = sa.update(workers).where(workers.c.id == worker_id).values(heartbeat_at=now(conn))
        return bool(conn.execute(beat, execution_options=db.execution_options).rowcount)


def worker_unregister(db: Database, worker_id: str) -> None:
    with db.begin() as conn:
        conn.execute(
            sa.delete(workers).where(workers.c.id == worker_id),
            execution_options=db.execution_options,
        )
