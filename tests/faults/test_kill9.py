"""kill -9 of a worker with running jobs: another worker completes them all, promptly."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tasklet import storage
from tasklet._database import Database
from tests import worker_jobs
from tests.support import Backend, Log, tasklet_process, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]

LOST_AFTER_S, SWEEP_S = 1.0, 0.2
FAST = ["--heartbeat", "0.2", "--lost-after", str(LOST_AFTER_S), "--sweep", str(SWEEP_S)]
RUNNING, WAITING = 50, 30
# The rescuer's own start (a new interpreter importing tasklet) is not part of the bound.
STARTUP_ALLOWANCE_S = 5.0


def test_a_killed_workers_jobs_are_rescued_within_the_lease_and_sweep(
    backend: Backend, db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    # The first 50 are claimed and run for a minute; the other 30 wait for a free slot.
    handles = worker_jobs.nap.defer_many([{"first_run_s": 60.0}] * RUNNING)
    handles += worker_jobs.nap.defer_many([{"first_run_s": 0.0}] * WAITING)
    victim = tasklet_process(
        backend, log, "worker", "-q", "work", "--concurrency", str(RUNNING), *FAST
    )
    processes.append(victim)
    wait_for(lambda: len(log.lines("start")) == RUNNING)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()

    processes.append(tasklet_process(backend, log, "worker", "-q", "work", *FAST))
    wait_for(lambda: storage.jobs_count(db) == {"succeeded": RUNNING + WAITING}, timeout=60)
    elapsed = time.monotonic() - killed_at

    # Dead after LOST_AFTER_S, found within SWEEP_S, back spread over LOST_AFTER_S.
    bound = LOST_AFTER_S + SWEEP_S + LOST_AFTER_S + STARTUP_ALLOWANCE_S
    assert elapsed <= bound, f"rescue took {elapsed:.1f}s, more than {bound:.1f}s"
    runs = {
        h.id: [(r.attempt, r.outcome) for r in storage.job_runs_list(db, h.id)] for h in handles
    }
    started = {job_id for job_id, _ in log.lines("start") if job_id in runs}
    lost = [job_id for job_id, r in runs.items() if r == [(1, "lost"), (2, "succeeded")]]
    untouched = [job_id for job_id, r in runs.items() if r == [(1, "succeeded")]]
    # The 50 that were running lost an attempt; the 30 it had not claimed never did
    # (a worker claims only jobs it starts at once: nothing waits claimed but unstarted).
    assert len(lost) == RUNNING and len(untouched) == WAITING, runs
    assert len(started) == RUNNING + WAITING
    assert log.done_per_job() == {job_id: 1 for job_id in runs}
