"""Cancelling jobs: queued ones never run, running ones stop and are never retried."""

from __future__ import annotations

import subprocess
import threading
import time

import anyio
import pytest
import sqlalchemy as sa

import tasklet
from tasklet import Cancel, JobContext, job, storage
from tasklet._database import Database
from tasklet.schema import jobs
from tasklet.worker import WorkerSettings
from tests import worker_jobs
from tests.support import (
    Backend,
    BackgroundWorker,
    Log,
    drain,
    get_row,
    runs,
    tasklet_process,
    wait_for,
)

# poll_s=60: nothing but a cancel's own delivery can explain a prompt stop.
FAST = WorkerSettings(
    concurrency=4, heartbeat_s=0.2, lost_after_s=1.0, sweep_s=0.2, grace_s=5, poll_s=60
)


# ------------------------------------------------------------- not running


def test_cancelled_queued_job_is_cancelled_at_once_and_never_runs(db: Database) -> None:
    ran: list[bool] = []

    @job(name="t.cancel.queued")
    def work() -> None:
        ran.append(True)

    handle = work.defer()
    assert tasklet.cancel(handle.id) is True
    row = get_row(db, handle.id)
    assert row.status == "cancelled"
    assert row.finished_at is not None and row.cancel_requested_at is not None

    drain(FAST)
    assert ran == [] and runs(db, handle.id) == []


def test_cancelled_scheduled_job_is_cancelled_at_once(db: Database) -> None:
    @job(name="t.cancel.scheduled")
    def work() -> None: ...

    handle = work.defer_in(3600)
    assert tasklet.cancel(handle.id) is True
    assert get_row(db, handle.id).status == "cancelled"


def test_cancel_of_a_finished_job_returns_false_and_changes_nothing(db: Database) -> None:
    @job(name="t.cancel.finished")
    def work() -> int:
        return 1

    handle = work.defer()
    drain(FAST)
    assert tasklet.cancel(handle.id) is False
    row = get_row(db, handle.id)
    assert (row.status, row.cancel_requested_at) == ("succeeded", None)


def test_cancel_of_an_unknown_job_raises_job_not_found(db: Database) -> None:
    with pytest.raises(tasklet.JobNotFoundError, match="no job with id 424242"):
        tasklet.cancel(424242)


def test_cancel_takes_a_job_id_not_a_handle(db: Database) -> None:
    @job(name="t.cancel.handle_type")
    def work() -> None: ...

    handle = work.defer()
    with pytest.raises(TypeError, match=r"handle\.id"):
        tasklet.cancel(handle)  # type: ignore[arg-type]


def test_handle_cancel_and_cancel_async_cancel_the_job(db: Database) -> None:
    @job(name="t.cancel.handles")
    def work() -> None: ...

    first, second = work.defer(), work.defer()
    assert first.cancel() is True
    assert anyio.run(second.cancel_async) is True
    assert anyio.run(tasklet.cancel_async, second.id) is False  # already cancelled
    assert [get_row(db, h.id).status for h in (first, second)] == ["cancelled", "cancelled"]


# ----------------------------------------------------------------- running


def test_running_async_job_is_cancelled_at_its_next_await_within_a_second(db: Database) -> None:
    started = threading.Event()

    @job(name="t.cancel.async", max_attempts=3)
    async def slow() -> None:
        started.set()
        await anyio.sleep(60)

    handle = slow.defer()
    with BackgroundWorker(FAST):
        assert started.wait(10)
        began = time.monotonic()
        assert tasklet.cancel(handle.id) is True
        wait_for(lambda: get_row(db, handle.id).status == "cancelled", timeout=5)
        assert time.monotonic() - began < 1.0

    assert runs(db, handle.id) == [(1, "cancelled")]
    assert get_row(db, handle.id).finished_at is not None


def test_running_sync_job_sees_ctx_cancelled_and_raising_ends_it_cancelled(db: Database) -> None:
    started = threading.Event()

    @job(name="t.cancel.sync", max_attempts=3)
    def careful(ctx: JobContext) -> None:
        started.set()
        deadline = time.monotonic() + 30
        while not ctx.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        if ctx.cancelled:
            raise Cancel("stopped between steps")

    handle = careful.defer()
    with BackgroundWorker(FAST):
        assert started.wait(10)
        tasklet.cancel(handle.id)
        wait_for(lambda: get_row(db, handle.id).status == "cancelled", timeout=5)

    (run,) = storage.job_runs_list(db, handle.id)
    assert (run.outcome, run.error) == ("cancelled", "Cancel: stopped between steps")


def test_sync_job_that_returns_normally_after_a_cancel_has_succeeded(db: Database) -> None:
    started = threading.Event()

    @job(name="t.cancel.sync_returns")
    def careful(ctx: JobContext) -> str:
        started.set()
        deadline = time.monotonic() + 30
        while not ctx.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        return "partial"

    handle = careful.defer()
    with BackgroundWorker(FAST):
        assert started.wait(10)
        tasklet.cancel(handle.id)
        wait_for(lambda: get_row(db, handle.id).status != "running", timeout=5)

    assert get_row(db, handle.id).status == "succeeded"
    assert [(r.outcome, r.result) for r in storage.job_runs_list(db, handle.id)] == [
        ("succeeded", "partial")
    ]


def test_failure_after_a_cancel_is_not_retried(db: Database) -> None:
    started = threading.Event()

    @job(name="t.cancel.fails", max_attempts=5, backoff=0)
    def careless(ctx: JobContext) -> None:
        started.set()
        deadline = time.monotonic() + 30
        while not ctx.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        raise RuntimeError("half-done")

    handle = careless.defer()
    with BackgroundWorker(FAST):
        assert started.wait(10)
        tasklet.cancel(handle.id)
        wait_for(lambda: get_row(db, handle.id).status != "running", timeout=5)

    row = get_row(db, handle.id)
    assert (row.status, row.attempts) == ("cancelled", 1)
    assert runs(db, handle.id) == [(1, "cancelled")]
    assert row.last_error == "RuntimeError: half-done"


def test_job_that_raises_cancel_ends_cancelled_without_retry(db: Database) -> None:
    @job(name="t.cancel.itself", max_attempts=5, backoff=0)
    def gives_up() -> None:
        raise Cancel("the order was withdrawn")

    handle = gives_up.defer()
    drain(FAST)

    assert get_row(db, handle.id).status == "cancelled"
    assert runs(db, handle.id) == [(1, "cancelled")]


def test_after_failure_hooks_see_a_cancel_error_with_no_retry(db: Database) -> None:
    started = threading.Event()
    seen: list[tuple[str, bool | None]] = []

    @job(name="t.cancel.hooked", max_attempts=3)
    async def slow() -> None:
        started.set()
        await anyio.sleep(60)

    @slow.after_failure
    def record(ctx: JobContext, error: BaseException) -> None:
        seen.append((type(error).__name__, ctx.will_retry))

    handle = slow.defer()
    with BackgroundWorker(FAST):
        assert started.wait(10)
        tasklet.cancel(handle.id)
        wait_for(lambda: get_row(db, handle.id).status == "cancelled", timeout=5)

    assert seen == [("Cancel", False)]


def test_cancel_request_without_a_notification_reaches_the_worker_by_its_check(
    db: Database,
) -> None:
    """The safety net: PostgreSQL looks on every heartbeat, SQLite every cancel_check_s."""
    started = threading.Event()

    @job(name="t.cancel.unnotified")
    async def slow() -> None:
        started.set()
        await anyio.sleep(60)

    handle = slow.defer()
    with BackgroundWorker(FAST):
        assert started.wait(10)
        # What cancel() stores, without its NOTIFY or its in-process message.
        with db.begin() as conn:
            request = (
                sa.update(jobs)
                .where(jobs.c.id == handle.id)
                .values(cancel_requested_at=storage.utcnow())
            )
            conn.execute(request, execution_options=db.execution_options)
        wait_for(lambda: get_row(db, handle.id).status == "cancelled", timeout=5)

    assert runs(db, handle.id) == [(1, "cancelled")]


# --------------------------------------------------------- other processes


@pytest.mark.slow
def test_cancel_from_another_process_stops_the_job_in_a_worker_process(
    backend: Backend, db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    """PostgreSQL: by NOTIFY; SQLite: by the worker's check. Heartbeats (5 s) are too slow."""
    handle = worker_jobs.nap.defer(first_run_s=60.0)
    processes.append(tasklet_process(backend, log, "worker", "-q", "work", "--poll", "60"))
    wait_for(lambda: len(log.lines("start")) == 1)

    began = time.monotonic()
    assert tasklet.cancel(handle.id) is True
    wait_for(lambda: get_row(db, handle.id).status == "cancelled", timeout=10)

    assert time.monotonic() - began < 2.0
    assert runs(db, handle.id) == [(1, "cancelled")]
    assert log.lines("done") == []


def test_reconnected_listener_still_hears_cancels(pg_db: Database) -> None:
    started = threading.Event()

    @job(name="t.cancel.reconnected")
    async def slow() -> None:
        started.set()
        await anyio.sleep(60)

    handle = slow.defer()
    # Heartbeats every 10 s: only the notification can stop the job in time.
    settings = WorkerSettings(heartbeat_s=10, lost_after_s=30, poll_s=60)
    with BackgroundWorker(settings) as worker:
        listener = worker.listener
        assert listener is not None and listener.connected.wait(10)
        assert started.wait(10)
        with pg_db.engine.begin() as conn:
            terminate = sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = :name"
            )
            assert conn.execute(terminate, {"name": listener.application_name}).all() == [(True,)]
        wait_for(lambda: listener.connections >= 2 and listener.connected.is_set())

        began = time.monotonic()
        assert storage.job_cancel(pg_db, handle.id) == "requested"  # NOTIFY only
        wait_for(lambda: get_row(pg_db, handle.id).status == "cancelled", timeout=10)
        assert time.monotonic() - began < 2.0
