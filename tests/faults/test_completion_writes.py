"""Finishing survives a database that refuses writes for a while: nothing is dropped."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from tasklet import job, storage
from tasklet._database import Database
from tasklet.worker import Worker, WorkerSettings

pytestmark = pytest.mark.faults


def _is_finish(statement: str) -> bool:
    """The statement that finishes a batch of attempts (storage/_sql.py), on either database."""
    return "UPDATE" in statement and "batch" in statement


def test_every_job_finishes_when_the_first_finish_writes_fail(db: Database) -> None:
    @job(name="faults.flaky_db")
    async def work(n: int) -> int:
        return n

    handles = work.defer_many([{"n": n} for n in range(200)])
    failures = {"left": 5, "seen": 0}

    def refuse_finish(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if _is_finish(statement):
            failures["seen"] += 1
            if failures["left"] > 0:
                failures["left"] -= 1
                raise sa.exc.OperationalError(statement, None, Exception("injected fault"))

    engines = {db.engine, db.autocommit_engine}
    for engine in engines:
        event.listen(engine, "before_cursor_execute", refuse_finish)
    try:
        Worker(WorkerSettings(concurrency=50)).run_sync(drain=True)
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", refuse_finish)

    assert failures["left"] == 0 and failures["seen"] > 5, failures
    assert storage.jobs_count(db) == {"succeeded": 200}
    runs = [storage.job_runs_list(db, h.id) for h in handles]
    assert [len(r) for r in runs] == [1] * 200
    assert {r[0].outcome for r in runs} == {"succeeded"}
