"""Pausing and resuming queues: paused queues take jobs, no worker starts them, resume is prompt."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
import time

import pytest

import tasklet
from tasklet import _wakeup, job, storage
from tasklet._database import Database
from tasklet.worker import WorkerSettings
from tests import worker_jobs
from tests.support import REPO, Backend, BackgroundWorker, Log, finish, tasklet_process, wait_for


def statuses(db: Database, handles: list[tasklet.JobHandle]) -> list[str]:
    rows = [storage.job_get(db, h.id) for h in handles]
    return [row.status if row is not None else "gone" for row in rows]


# ------------------------------------------------------------------ the API


def test_a_paused_queue_is_listed_with_its_pause_time_until_it_is_resumed(db: Database) -> None:
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)

    assert tasklet.pause_queue("email") is True
    paused = tasklet.paused_queues()
    assert list(paused) == ["email"]
    assert before <= paused["email"] <= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)

    assert tasklet.resume_queue("email") is True
    assert tasklet.paused_queues() == {}


def test_pausing_a_paused_queue_changes_nothing_and_says_so(db: Database) -> None:
    tasklet.pause_queue("email")
    first = tasklet.paused_queues()

    assert tasklet.pause_queue("email") is False
    assert tasklet.paused_queues() == first


def test_resuming_a_queue_that_is_not_paused_says_so(db: Database) -> None:
    assert tasklet.resume_queue("email") is False


def test_queue_names_are_checked_before_pausing(db: Database) -> None:
    with pytest.raises(ValueError, match="queue must be a non-empty string"):
        tasklet.pause_queue("")
    assert tasklet.paused_queues() == {}


def test_a_paused_queue_still_accepts_jobs(db: Database) -> None:
    @job(name="t.mail", queue="email")
    def mail() -> None: ...

    tasklet.pause_queue("email")
    handle = mail.defer()

    assert statuses(db, [handle]) == ["queued"]


# ------------------------------------------------------------ the claim


@pytest.mark.parametrize("queues", [None, ("email", "default")], ids=["all", "given"])
def test_claims_leave_out_the_jobs_of_paused_queues(
    db: Database, queues: tuple[str, ...] | None
) -> None:
    @job(name="t.any")
    def anything() -> None: ...

    paused = anything.options(queue="email").defer()
    other = anything.defer()
    tasklet.pause_queue("email")

    claimed = storage.jobs_claim(db, worker_id="w", queues=queues, names=["t.any"], limit=10)

    assert [j.id for j in claimed] == [other.id]
    assert statuses(db, [paused]) == ["queued"]


def test_next_due_leaves_out_the_jobs_of_paused_queues(db: Database) -> None:
    @job(name="t.any")
    def anything() -> None: ...

    anything.options(queue="email").defer()
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    anything.defer_at(later)
    tasklet.pause_queue("email")

    due = storage.jobs_next_due(db, queues=None, names=["t.any"])

    assert due is not None and abs(due - later) < dt.timedelta(seconds=1)


# -------------------------------------------------------- workers in this process


def test_a_running_job_of_a_paused_queue_finishes_and_the_next_does_not_start(
    db: Database,
) -> None:
    release = threading.Event()
    started: list[int] = []

    @job(name="t.slow", queue="email")
    def slow(i: int) -> None:
        started.append(i)
        release.wait(10)

    first = slow.defer(i=1)
    with BackgroundWorker(WorkerSettings(concurrency=1, poll_s=0.05)):
        wait_for(lambda: started == [1])
        tasklet.pause_queue("email")
        second = slow.defer(i=2)
        # Claimed after `second` were its queue not paused (one slot, claimed by id).
        marker = slow.options(queue="default").defer(i=3)
        release.set()
        wait_for(lambda: statuses(db, [first, marker]) == ["succeeded"] * 2)

    assert statuses(db, [second]) == ["queued"] and started == [1, 3]


def test_resuming_wakes_an_idle_worker_of_this_process_at_once(db: Database) -> None:
    done = threading.Event()

    @job(name="t.mail", queue="email")
    def mail() -> None:
        done.set()

    tasklet.pause_queue("email")
    mail.defer()
    with BackgroundWorker(WorkerSettings(poll_s=60)) as worker:
        assert worker.idle.wait(10)
        # A worker that just heard a notification keeps looking for a second: wait it out,
        # so that from now on only a wake-up can start the job.
        wait_for(lambda: time.monotonic() > worker._hot_until)
        tasklet.resume_queue("email")
        assert done.wait(10), "resuming did not wake the idle worker"


# ------------------------------------------------------------ worker processes


@pytest.mark.slow
def test_a_worker_process_starts_no_job_of_a_paused_queue_while_others_run_and_resumes_promptly(
    backend: Backend, db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    worker = tasklet_process(backend, log, "worker", "--poll", "30")
    processes.append(worker)
    tasklet.pause_queue("email")
    held = worker_jobs.count.options(queue="email").defer_many([{"n": i} for i in range(5)])
    flowing = worker_jobs.count.options(queue="work").defer_many([{"n": i} for i in range(5)])

    wait_for(lambda: statuses(db, flowing) == ["succeeded"] * 5)
    assert statuses(db, held) == ["queued"] * 5
    assert set(log.done_per_job()) == {h.id for h in flowing}

    # A worker that just heard notifications keeps looking for a moment: let that pass,
    # so that only the resume's wake-up can explain a prompt start.
    time.sleep(_wakeup.HOT_FOR_S + 0.2)
    assert statuses(db, held) == ["queued"] * 5
    resumed_at = time.monotonic()
    tasklet.resume_queue("email")
    # The poll is 30 s: only the resume's wake-up can start them this soon.
    wait_for(lambda: statuses(db, held) == ["succeeded"] * 5, timeout=10)
    assert time.monotonic() - resumed_at < 10

    worker.terminate()
    code, output = finish(worker)
    assert code == 0, output


@pytest.mark.slow
def test_queue_commands_pause_list_and_resume(backend: Backend, db: Database) -> None:
    worker_jobs.count.options(queue="email").defer_many([{"n": 1}, {"n": 2}])

    def cli(*args: str) -> tuple[int, str]:
        result = subprocess.run(
            [sys.executable, "-m", "tasklet", *args],
            env=backend.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result.returncode, result.stdout + result.stderr

    assert cli("queue", "pause", "email") == (
        0,
        "tasklet: paused queue 'email': it takes jobs and running ones finish, none starts\n",
    )
    assert cli("queue", "pause", "email") == (0, "tasklet: queue 'email' was already paused\n")
    code, listing = cli("queue", "list")
    assert code == 0
    header, row = listing.splitlines()
    assert header.split() == ["QUEUE", "QUEUED", "RUNNING", "PAUSED", "SINCE"]
    assert row.split()[:3] == ["email", "2", "0"] and row.split()[3] != "-"
    assert cli("queue", "resume", "email") == (0, "tasklet: resumed queue 'email'\n")
    assert cli("queue", "resume", "email") == (0, "tasklet: queue 'email' was not paused\n")
    assert tasklet.paused_queues() == {}
