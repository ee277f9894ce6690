"""SIGTERM under load: running jobs finish, nothing new starts, the queue keeps the rest."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tasklet import storage
from tasklet._database import Database
from tests import worker_jobs
from tests.support import Backend, Log, finish, tasklet_process, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]

RUNNING, QUEUED, GRACE_S = 50, 500, 30.0


def test_sigterm_with_50_running_and_500_queued_loses_and_starts_nothing(
    backend: Backend, db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    worker_jobs.nap.defer_many([{"first_run_s": 1.0}] * RUNNING)
    waiting = worker_jobs.nap.options(priority=1).defer_many([{"first_run_s": 0.0}] * QUEUED)
    worker = tasklet_process(
        backend, log, "worker", "-q", "work", "--concurrency", str(RUNNING),
        "--grace", str(GRACE_S), "--log-level", "WARNING",
    )  # fmt: skip
    processes.append(worker)
    wait_for(lambda: len(log.lines("start")) == RUNNING)
    signalled = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    code, output = finish(worker, timeout=GRACE_S + 10)
    stopped_within = time.monotonic() - signalled

    assert code == 0, output
    assert stopped_within < GRACE_S
    assert len(log.lines("start")) == RUNNING, "a job started after the signal"
    assert len(log.lines("done")) == RUNNING
    assert storage.jobs_count(db) == {"succeeded": RUNNING, "queued": QUEUED}
    rows = [storage.job_get(db, h.id) for h in waiting]
    assert {(r.attempts, r.locked_by) for r in rows if r} == {(0, None)}
