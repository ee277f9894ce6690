"""How jobs ended, for callers waiting on a job's result (see tasklet.results)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from .._database import Database
from ..schema import TERMINAL_STATUSES, job_runs, jobs
from ._sql import table

#: Ids per statement when looking at many awaited jobs at once.
_CHUNK = 500


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """A job's status and, once it is final, what its last attempt left behind."""

    status: str
    result: Any = None
    error: str | None = None
    traceback: str | None = None


def job_outcome(db: Database, job_id: int) -> JobOutcome | None:
    """The job's status, with the result or error of its final attempt; None if it is gone."""
    options = db.execution_options
    with db.begin(read_only=True) as conn:
        query = sa.select(jobs.c.status, jobs.c.last_error).where(jobs.c.id == job_id)
        row = conn.execute(query, execution_options=options).first()
        if row is None:
            return None
        status, last_error = row
        if status not in TERMINAL_STATUSES:
            return JobOutcome(status)
        runs = sa.select(job_runs.c.result, job_runs.c.error, job_runs.c.traceback).where(
            job_runs.c.job_id == job_id
        )
        if status == "succeeded":
            runs = runs.where(job_runs.c.outcome == "succeeded")
        last = conn.execute(
            runs.order_by(job_runs.c.id.desc()).limit(1), execution_options=options
        ).first()
    if last is None:  # finished without a recorded attempt (e.g. cancelled while queued)
        return JobOutcome(status, error=last_error)
    return JobOutcome(status, result=last.result, error=last.error or last_error,
                      traceback=last.traceback)  # fmt: skip


def jobs_finished(db: Database, job_ids: Collection[int]) -> set[int]:
    """Those of ``job_ids`` that are no longer queued or running (finished, or deleted)."""
    ids = list(job_ids)
    waiting: set[int] = set()
    with db.begin(read_only=True) as conn:
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            query = sa.select(jobs.c.id).where(
                jobs.c.id.in_(chunk), jobs.c.status.in_(("queued", "running"))
            )
            waiting.update(conn.execute(query, execution_options=db.execution_options).scalars())
    return set(ids) - waiting


_PG_UNFINISHED = """
SELECT id FROM {jobs} WHERE id = ANY(%(ids)s::bigint[]) AND status IN ('queued', 'running')
"""


def pg_jobs_finished(conn: Any, schema: str | None, job_ids: Collection[int]) -> set[int]:
    """:func:`jobs_finished` on a psycopg connection of the caller's (the results watcher's)."""
    ids = list(job_ids)
    sql = _PG_UNFINISHED.format(jobs=table(schema, "jobs"))
    waiting = {row[0] for row in conn.execute(sql, {"ids": ids}).fetchall()}
    return set(ids) - waiting
