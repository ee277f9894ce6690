"""A worker presumed dead cannot overwrite the outcome of the attempt that replaced it."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tasklet import storage
from tasklet._database import Database
from tests import worker_jobs
from tests.support import Backend, Log, finish, tasklet_process, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]

FAST = ["--heartbeat", "0.2", "--lost-after", "1", "--sweep", "0.2", "--log-level", "INFO"]


def test_a_paused_worker_that_comes_back_changes_nothing_and_says_so(
    pg_backend: Backend, pg_db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    # PostgreSQL only: on SQLite a frozen process may hold the one write lock, and every
    # other writer waits for it; SQLite's fencing is proven in tests/test_storage.py.
    backend, db = pg_backend, pg_db
    # The first run takes 1.5 s: long enough to pause its worker in the middle.
    handle = worker_jobs.nap.defer(first_run_s=1.5)
    paused = tasklet_process(backend, log, "worker", "-q", "work", *FAST)
    processes.append(paused)
    wait_for(lambda: len(log.lines("start")) == 1)
    os.killpg(paused.pid, signal.SIGSTOP)  # frozen: no heartbeat, no result

    rescuer = tasklet_process(backend, log, "worker", "-q", "work", *FAST)
    processes.append(rescuer)
    wait_for(lambda: storage.jobs_count(db) == {"succeeded": 1})
    os.killpg(paused.pid, signal.SIGCONT)  # it finishes its attempt and tries to record it
    wait_for(lambda: len(log.lines("done")) == 2)  # both runs of the job ended
    paused.terminate()
    _, output = finish(paused)
    rescuer.terminate()
    finish(rescuer)

    outcomes = [(r.attempt, r.outcome) for r in storage.job_runs_list(db, handle.id)]
    assert outcomes == [(1, "lost"), (2, "succeeded")]
    assert "was not recorded" in output


def test_sweepers_racing_over_a_thousand_orphans_rescue_each_once(db: Database) -> None:
    import threading
    from collections import Counter

    import sqlalchemy as sa

    from tasklet.schema import workers

    worker_jobs.count.defer_many([{"n": n} for n in range(1000)])
    storage.worker_register(db, worker_id="dead", host="h", pid=1, queues=[], concurrency=1000)
    claimed = storage.jobs_claim(
        db, worker_id="dead", queues=None, names=["tests.worker.count"], limit=1000
    )
    assert len(claimed) == 1000
    with db.begin() as conn:  # its heartbeat stopped a minute ago
        old = storage.utcnow().replace(year=2000)
        if db.dialect == "sqlite":
            old = old.replace(tzinfo=None)
        conn.execute(
            sa.update(workers).values(heartbeat_at=old), execution_options=db.execution_options
        )
    rescued: Counter[int] = Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def sweep() -> None:
        try:
            for row in storage.jobs_rescue(db, lost_after_s=30, max_lost=3):
                with lock:
                    rescued[row.id] += 1
        except BaseException as exc:  # a deadlock or lock error must fail the test
            errors.append(exc)

    sweepers = [threading.Thread(target=sweep) for _ in range(6)]
    for sweeper in sweepers:
        sweeper.start()
    for sweeper in sweepers:
        sweeper.join(120)

    assert errors == []
    assert len(rescued) == 1000 and set(rescued.values()) == {1}
    assert storage.jobs_count(db) == {"queued": 1000}
