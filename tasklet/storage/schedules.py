"""The ticks of recurring schedules: each one enqueued once, however many workers schedule.

The primary key of ``schedule_ticks`` (schedule, tick) is the guarantee: a
worker inserts the tick's row and its job in one transaction, and the row of
a tick another worker has already taken makes it do nothing. On PostgreSQL a
worker whose insert meets a tick being enqueued by an open transaction waits
for it: if that one rolls back, this one enqueues the tick.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from .._database import Database
from ..schema import schedule_ticks
from ._sql import now, stamp
from .jobs import jobs_insert
from .rows import NewJob, as_utc
from .unique import InsertedJob, jobs_insert_unique

_TICKS = schedule_ticks.c


def schedule_tick_insert(
    db: Database, *, schedule: str, tick: dt.datetime, job: NewJob
) -> InsertedJob | None:
    """Enqueue ``job`` for this tick of ``schedule``, unless the tick already was (None).

    A unique job whose key is held takes the tick without a second job: the
    tick's row then names the job that holds the key.
    """
    dialect = postgresql if db.dialect == "postgresql" else sqlite
    with db.begin() as conn:
        options = db.execution_options
        taken = conn.execute(
            dialect.insert(schedule_ticks)
            .values(schedule=schedule, tick=stamp(conn, tick), job_id=None, created_at=now(conn))
            .on_conflict_do_nothing(index_elements=[_TICKS.schedule, _TICKS.tick])
            .returning(_TICKS.tick),
            execution_options=options,
        ).first()
        if taken is None:
            return None
        if job.unique_key is None:
            (job_id,) = jobs_insert(db, [job], conn)
            inserted = InsertedJob(job_id, job.name, True)
        else:
            (inserted,) = jobs_insert_unique(db, [job], conn)
        conn.execute(
            sa.update(schedule_ticks)
            .where(_TICKS.schedule == schedule, _TICKS.tick == stamp(conn, tick))
            .values(job_id=inserted.id),
            execution_options=options,
        )
    return inserted


def schedule_last_ticks(db: Database, schedules: Sequence[str]) -> dict[str, dt.datetime]:
    """The latest tick enqueued of each of these schedules that has one."""
    query = (
        sa.select(_TICKS.schedule, sa.func.max(_TICKS.tick))
        .where(_TICKS.schedule.in_(schedules))
        .group_by(_TICKS.schedule)
    )
    with db.begin(read_only=True) as conn:
        rows = conn.execute(query, execution_options=db.execution_options).all()
    last = {}
    for name, value in rows:
        if isinstance(value, str):  # SQLite's max() returns the stored text
            value = dt.datetime.fromisoformat(value)
        tick = as_utc(value)
        if tick is not None:
            last[name] = tick
    return last


def schedule_ticks_prune(db: Database, keep: Mapping[str, int], *, before: dt.datetime) -> int:
    """Delete ticks older than ``before``, past the ``keep[name]`` latest of each schedule.

    Returns how many rows went.
    """
    deleted = 0
    with db.begin() as conn:
        for name, count in keep.items():
            newest_kept = (
                sa.select(_TICKS.tick)
                .where(_TICKS.schedule == name)
                .order_by(_TICKS.tick.desc())
                .limit(1)
                .offset(count - 1)
                .scalar_subquery()
            )
            delete = sa.delete(schedule_ticks).where(
                _TICKS.schedule == name,
                _TICKS.tick < newest_kept,
                _TICKS.tick < stamp(conn, before),
            )
            deleted += conn.execute(delete, execution_options=db.execution_options).rowcount
    return deleted
