"""`tasklet worker` and `tasklet workoff` as processes: no job run twice, none lost.

Jobs record each run in an append-only file (tests/worker_jobs.py), outside the
database, so these tests count real executions.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from tasklet import storage
from tasklet._database import Database
from tests import worker_jobs
from tests.support import Backend, Log, finish, tasklet_process, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# Short heartbeats so that a dead worker is noticed within about a second.
FAST = ["--heartbeat", "0.2", "--lost-after", "1", "--sweep", "0.2"]


def test_workers_in_several_processes_run_each_job_exactly_once(
    backend: Backend, db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    handles = worker_jobs.count.defer_many([{"n": i} for i in range(600)])
    processes.extend(
        tasklet_process(backend, log, "workoff", "-q", "work", "--concurrency", "8")
        for _ in range(3)
    )
    results = [finish(p) for p in processes]

    assert [code for code, _ in results] == [0, 0, 0], results
    done = log.done_per_job()
    assert sorted(done) == sorted(h.id for h in handles)
    assert [job_id for job_id, n in done.items() if n > 1] == []
    assert storage.jobs_count(db) == {"succeeded": 600}


def test_jobs_of_a_killed_worker_are_rescued_and_completed_by_another(
    backend: Backend, db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    handles = worker_jobs.nap.defer_many([{"first_run_s": 60.0}] * 5)
    victim = tasklet_process(backend, log, "worker", "-q", "work", *FAST)
    processes.append(victim)
    wait_for(lambda: len(log.lines("start")) == 5)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()

    processes.append(tasklet_process(backend, log, "worker", "-q", "work", *FAST))
    wait_for(lambda: storage.jobs_count(db) == {"succeeded": 5})

    for handle in handles:
        outcomes = [(r.attempt, r.outcome) for r in storage.job_runs_list(db, handle.id)]
        assert outcomes == [(1, "lost"), (2, "succeeded")]
    assert log.done_per_job() == Counter({h.id: 1 for h in handles})


def test_sigterm_lets_running_jobs_finish_and_exits_zero(
    backend: Backend, db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    worker_jobs.nap.defer_many([{"first_run_s": 0.5}] * 4)
    worker = tasklet_process(backend, log, "worker", "-q", "work", "--grace", "30", *FAST)
    processes.append(worker)
    wait_for(lambda: len(log.lines("start")) == 4)
    worker.send_signal(signal.SIGTERM)
    code, output = finish(worker)

    assert code == 0, output
    assert storage.jobs_count(db) == {"succeeded": 4}


def test_sigterm_puts_back_jobs_that_outlive_the_grace_period(
    backend: Backend, db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    handles = worker_jobs.nap.defer_many([{"first_run_s": 60.0}] * 3)
    worker = tasklet_process(backend, log, "worker", "-q", "work", "--grace", "0.3", *FAST)
    processes.append(worker)
    wait_for(lambda: len(log.lines("start")) == 3)
    worker.send_signal(signal.SIGTERM)
    code, output = finish(worker)

    assert code == 0, output
    assert storage.jobs_count(db) == {"queued": 3}
    rows = [storage.job_get(db, h.id) for h in handles]
    assert [(r.attempts, r.locked_by) for r in rows if r] == [(0, None)] * 3
    second = tasklet_process(backend, log, "workoff", "-q", "work")
    processes.append(second)
    assert finish(second)[0] == 0
    assert storage.jobs_count(db) == {"succeeded": 3}


def test_a_second_signal_stops_at_once(
    backend: Backend, db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    worker_jobs.nap.defer_many([{"first_run_s": 60.0}] * 2)
    worker = tasklet_process(backend, log, "worker", "-q", "work", "--grace", "600", *FAST)
    processes.append(worker)
    wait_for(lambda: len(log.lines("start")) == 2)
    worker.send_signal(signal.SIGTERM)  # graceful: would wait up to 600 s
    worker.send_signal(signal.SIGINT)  # at once
    code, output = finish(worker, timeout=30)

    assert code == 0, output
    assert storage.jobs_count(db) == {"queued": 2}


def test_an_idle_worker_is_woken_by_a_defer_from_another_process(
    backend: Backend, db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    worker = tasklet_process(backend, log, "worker", "-q", "work", "--poll", "600", *FAST)
    processes.append(worker)
    first = worker_jobs.count.defer(n=1)
    wait_for(lambda: first.id in log.done_per_job())
    # The worker is idle now and polls only every 10 minutes: a wake-up must start this one.
    second = worker_jobs.count.defer(n=2)
    wait_for(lambda: second.id in log.done_per_job(), timeout=20)


def test_workoff_exits_nonzero_when_the_database_is_unreachable(log: Log, tmp_path: Path) -> None:
    backend = Backend("postgres", "postgresql+psycopg://nobody:secret@127.0.0.1:1/none", None)
    code, output = finish(tasklet_process(backend, log, "workoff"))

    assert code != 0
    assert "127.0.0.1:1" in output and "secret" not in output
    assert "Traceback" not in output
