"""Jobs deferred in the caller's transaction exist, run and wake workers only if it commits."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy.orm import Session

from tasklet import job, storage
from tasklet._database import Database
from tasklet.worker import Worker, WorkerSettings
from tests.support import BackgroundWorker

pytestmark = pytest.mark.faults

N = 1000


def test_rolled_back_enqueues_leave_no_job_and_committed_ones_run_once(db: Database) -> None:
    runs: Counter[int] = Counter()

    @job(name="faults.tx")
    async def tx(n: int) -> None:
        runs[n] += 1

    for n in range(N):
        with Session(db.engine) as session, session.begin():
            tx.options(connection=session).defer(n=-n - 1)
            session.rollback()
    for n in range(N):
        with Session(db.engine) as session, session.begin():
            tx.options(connection=session).defer(n=n)

    Worker(WorkerSettings()).run_sync(drain=True)

    assert storage.jobs_count(db) == {"succeeded": N}
    assert sorted(runs) == list(range(N)) and set(runs.values()) == {1}


def test_no_job_starts_before_its_transaction_commits(db: Database) -> None:
    started = threading.Event()

    @job(name="faults.after_commit")
    def after_commit() -> None:
        started.set()

    with BackgroundWorker(WorkerSettings(poll_s=0.05)) as worker:
        assert worker.idle.wait(10)
        with Session(db.engine) as session, session.begin():
            handle = after_commit.options(connection=session).defer()
            # The worker keeps polling (every 50 ms) while the transaction is open:
            # ten chances to see the job, and it must see none.
            assert not started.wait(0.5), "a job ran before its transaction committed"
            assert worker.stats.total == 0
        assert started.wait(10)
    assert [r.outcome for r in storage.job_runs_list(db, handle.id)] == ["succeeded"]


def test_rolled_back_enqueues_send_no_wake_up(pg_db: Database) -> None:
    import psycopg

    @job(name="faults.quiet", queue="quiet")
    def quiet(n: int) -> None: ...

    with psycopg.connect(pg_db.conninfo, autocommit=True) as listener:
        listener.execute(f'LISTEN "{pg_db.notify_channel}"')
        for n in range(N):
            with Session(pg_db.engine) as session, session.begin():
                quiet.options(connection=session).defer(n=n)
                session.rollback()
        with Session(pg_db.engine) as session, session.begin():
            # One that commits, on another queue: the first notification must be its.
            quiet.options(connection=session, queue="marker").defer(n=N)
        payloads = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
        later = list(listener.notifies(timeout=0.5))
    assert payloads == ["marker"] and later == []
    assert storage.jobs_count(pg_db) == {"queued": 1}
