"""A job that kills its worker every time is failed after a few losses; the rest complete."""

from __future__ import annotations

import subprocess
import time

import pytest

from tasklet import storage
from tasklet._database import Database
from tests import worker_jobs
from tests.support import Backend, Log, tasklet_process

pytestmark = [pytest.mark.faults, pytest.mark.slow]

GOOD, MAX_LOST = 1000, 3
FAST = ["--heartbeat", "0.2", "--lost-after", "1", "--sweep", "0.2", "--log-level", "WARNING"]


def test_a_job_that_kills_its_worker_is_failed_and_the_others_complete_once(
    backend: Backend, db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    worker_jobs.count.defer_many([{"n": n} for n in range(GOOD // 2)])
    poison = worker_jobs.crash.defer()
    worker_jobs.count.defer_many([{"n": n} for n in range(GOOD // 2, GOOD)])

    # The test is the supervisor: it restarts the worker whenever the worker dies.
    crashes = 0
    deadline = time.monotonic() + 120
    while storage.jobs_count(db) != {"succeeded": GOOD, "failed": 1}:
        assert time.monotonic() < deadline, storage.jobs_count(db)
        worker = tasklet_process(backend, log, "worker", "-q", "work", *FAST)
        processes.append(worker)
        while worker.poll() is None and storage.jobs_count(db) != {
            "succeeded": GOOD,
            "failed": 1,
        }:
            assert time.monotonic() < deadline, storage.jobs_count(db)
            time.sleep(0.05)  # a supervisor's watch loop; the deadline bounds it
        crashes += worker.poll() is not None

    row = storage.job_get(db, poison.id)
    assert row is not None and (row.status, row.lost_count) == ("failed", MAX_LOST)
    assert crashes == MAX_LOST
    # At least once: each good job succeeded exactly once; only jobs a crash caught in
    # flight (their attempt recorded as lost) may have run twice.
    good = [job_id for job_id in log.done_per_job() if job_id != poison.id]
    outcomes = {job_id: [r.outcome for r in storage.job_runs_list(db, job_id)] for job_id in good}
    assert len(good) == GOOD
    assert all(runs.count("succeeded") == 1 for runs in outcomes.values())
    reran = [job_id for job_id, n in log.done_per_job().items() if n > 1]
    assert all("lost" in outcomes[job_id] for job_id in reran), reran
