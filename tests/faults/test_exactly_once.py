"""Without faults, every job runs exactly once across many worker and producer processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tasklet import storage
from tasklet._database import Database
from tests.support import REPO, Backend, Log, finish, tasklet_process, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]

PRODUCER = """
import sys
from tests import worker_jobs
first, count = int(sys.argv[1]), int(sys.argv[2])
for n in range(first, first + count, 100):
    worker_jobs.count.defer_many([{"n": i} for i in range(n, min(n + 100, first + count))])
"""

# Workers and producers at once, on two cores: (workers, producers, jobs) per database.
LOAD = {"postgres": (8, 4, 20_000), "sqlite": (4, 2, 5_000)}


def test_many_workers_and_producers_run_every_job_exactly_once(
    backend: Backend, db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    workers, producers, jobs = LOAD[backend.name]
    env = {**backend.env, "TASKLET_TEST_LOG": str(log.path)}
    processes.extend(
        tasklet_process(backend, log, "worker", "-q", "work", "--log-level", "WARNING")
        for _ in range(workers)
    )
    share = jobs // producers
    producing = [
        subprocess.Popen(
            [sys.executable, "-c", PRODUCER, str(p * share), str(share)],
            cwd=REPO,
            env=env,
            stderr=subprocess.PIPE,
        )
        for p in range(producers)
    ]
    for producer in producing:
        _, error = producer.communicate(timeout=300)
        assert producer.returncode == 0, error.decode()
    wait_for(lambda: storage.jobs_count(db).get("succeeded", 0) == jobs, timeout=300)
    for worker in processes:
        worker.terminate()
    outputs = [finish(worker)[1] for worker in processes]

    done = log.done_per_job()
    duplicates = sorted(job_id for job_id, runs in done.items() if runs > 1)
    assert duplicates == [], f"jobs run more than once: {duplicates[:50]}"
    assert len(done) == jobs and storage.jobs_count(db) == {"succeeded": jobs}
    assert not any("database is locked" in output for output in outputs)
