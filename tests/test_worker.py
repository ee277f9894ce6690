"""The worker in this process: running jobs, hooks, retries, timeouts, shutdown, wake-ups."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import sqlalchemy as sa

import tasklet
from tasklet import JobContext, _registry, job, storage
from tasklet._database import Database
from tasklet.retry import Abort, Retry
from tasklet.schema import jobs
from tasklet.worker import WorkerSettings
from tests.support import FAST, BackgroundWorker, drain, runs, wait_for


def status(db: Database, job_id: int) -> str:
    row = storage.job_get(db, job_id)
    assert row is not None
    return row.status


# ------------------------------------------------------------------ running


def test_sync_job_runs_and_its_attempt_is_recorded_with_the_result(db: Database) -> None:
    @job(name="t.add")
    def add(a: int, b: int) -> int:
        return a + b

    handle = add.defer(a=2, b=3)
    drain()

    (run,) = storage.job_runs_list(db, handle.id)
    assert (run.attempt, run.outcome, run.result, run.error) == (1, "succeeded", 5, None)
    assert run.worker_id is not None and run.started_at is not None
    assert run.finished_at >= run.started_at
    assert status(db, handle.id) == "succeeded"


def test_async_job_runs_on_the_event_loop(db: Database) -> None:
    loops: list[bool] = []

    @job(name="t.async")
    async def on_loop() -> str:
        await anyio.sleep(0)
        loops.append(threading.current_thread() is threading.main_thread())
        return "ok"

    handle = on_loop.defer()
    drain()

    assert loops == [True]
    assert runs(db, handle.id) == [(1, "succeeded")]


def test_sync_jobs_run_in_threads_up_to_the_concurrency(db: Database) -> None:
    barrier = threading.Barrier(4, timeout=10)

    @job(name="t.together")
    def together(i: int) -> None:
        barrier.wait()  # passes only if all four run at the same time

    handles = together.defer_many([{"i": i} for i in range(4)])
    drain(WorkerSettings(concurrency=4))

    assert [status(db, h.id) for h in handles] == ["succeeded"] * 4


def test_context_describes_the_attempt_and_is_not_a_deferred_argument(db: Database) -> None:
    seen: list[JobContext] = []

    @job(name="t.ctx", queue="q1", max_attempts=7)
    def with_context(ctx: JobContext, user_id: int) -> None:
        seen.append(ctx)

    when = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    handle = with_context.defer_at(when, user_id=5)
    worker = drain(WorkerSettings(queues=("q1",)))

    (ctx,) = seen
    assert (ctx.job_id, ctx.name, ctx.queue, ctx.attempt, ctx.max_attempts) == (
        handle.id,
        "t.ctx",
        "q1",
        1,
        7,
    )
    assert ctx.worker_id == worker.id
    assert ctx.scheduled_at is not None and abs(ctx.scheduled_at - when) < dt.timedelta(seconds=1)


def test_jobs_are_taken_by_priority_then_due_time_then_id(db: Database) -> None:
    order: list[str] = []

    @job(name="t.order")
    def record(label: str) -> None:
        order.append(label)

    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    record.defer(label="late-default")
    record.options(priority=-1).defer(label="urgent")
    record.defer_at(past, label="early-default")
    record.options(priority=5).defer(label="low")
    drain(WorkerSettings(concurrency=1))

    assert order == ["urgent", "early-default", "late-default", "low"]


def test_worker_takes_only_its_queues(db: Database) -> None:
    @job(name="t.queued", queue="a")
    def in_a() -> None: ...

    mine = in_a.defer()
    other = in_a.options(queue="b").defer()
    drain(WorkerSettings(queues=("a",)))

    assert (status(db, mine.id), status(db, other.id)) == ("succeeded", "queued")


def test_scheduled_job_is_not_run_before_it_is_due(db: Database) -> None:
    @job(name="t.later")
    def later() -> None: ...

    handle = later.defer_in(dt.timedelta(hours=1))
    worker = drain()

    assert status(db, handle.id) == "queued"
    assert worker.stats.total == 0


def test_unknown_job_stays_queued_with_a_message_naming_its_module(db: Database) -> None:
    @job(name="billing.jobs.charge")
    def charge() -> None: ...

    @job(name="t.known")
    def known() -> None: ...

    unknown = charge.defer()
    known_handle = known.defer()
    tasklet._registry.unregister("billing.jobs.charge")  # this worker does not know it
    drain()

    row = storage.job_get(db, unknown.id)
    assert row is not None and row.status == "queued"
    assert row.last_error is not None and "'billing.jobs'" in row.last_error
    assert "imports" in row.last_error
    assert status(db, known_handle.id) == "succeeded"


# -------------------------------------------------------------------- hooks


def test_hooks_run_global_first_on_the_way_in_and_last_on_the_way_out(db: Database) -> None:
    calls: list[str] = []

    @job(name="t.hooked")
    def hooked() -> int:
        calls.append("job")
        return 1

    tasklet.before_perform(lambda ctx: calls.append("global before"))
    hooked.before_perform(lambda ctx: calls.append("job before"))

    @hooked.after_success
    async def job_after(ctx: JobContext, result: object) -> None:
        calls.append(f"job after {result}")

    tasklet.after_success(lambda ctx, result: calls.append("global after"))
    hooked.defer()
    drain()

    assert calls == ["global before", "job before", "job", "job after 1", "global after"]


def test_failing_before_perform_fails_the_attempt_and_it_is_retried(db: Database) -> None:
    attempts: list[int] = []

    @job(name="t.guarded", max_attempts=2, backoff=0)
    def guarded(ctx: JobContext) -> None:
        attempts.append(ctx.attempt)

    @guarded.before_perform
    def refuse_first(ctx: JobContext) -> None:
        if ctx.attempt == 1:
            raise RuntimeError("not yet")

    handle = guarded.defer()
    drain()

    assert attempts == [2]
    assert runs(db, handle.id) == [(1, "failed"), (2, "succeeded")]


def test_failing_after_hook_is_logged_and_changes_nothing(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    @job(name="t.after_fails")
    def fine() -> None: ...

    @fine.after_success
    def broken_audit(ctx: JobContext, result: object) -> None:
        raise RuntimeError("audit down")

    handle = fine.defer()
    drain()

    assert runs(db, handle.id) == [(1, "succeeded")]
    assert any("broken_audit" in r.getMessage() for r in caplog.records)


def test_after_failure_tells_whether_the_job_will_be_retried(db: Database) -> None:
    seen: list[tuple[int, bool | None, str]] = []

    @job(name="t.doomed", max_attempts=2, backoff=0)
    def doomed() -> None:
        raise ValueError("no")

    @doomed.after_failure
    async def alert(ctx: JobContext, error: BaseException) -> None:
        seen.append((ctx.attempt, ctx.will_retry, str(error)))

    doomed.defer()
    drain()

    assert seen == [(1, True, "no"), (2, False, "no")]


# ------------------------------------------------------- jobs on their last chance


def test_jobs_on_their_last_chance_run_one_at_a_time_beside_the_others(db: Database) -> None:
    # A job lost max_lost - 1 times fails if its worker dies once more. Run one at a
    # time, none can be taken down by another that kills its worker.
    state = {"last_now": 0, "last_most": 0, "fresh_beside_last": 0}

    async def busy_for(seconds: float) -> None:  # the job's own work: it takes a while
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            await anyio.sleep(0.01)

    @job(name="t.last")
    async def last(i: int) -> None:
        state["last_now"] += 1
        state["last_most"] = max(state["last_most"], state["last_now"])
        await busy_for(0.2)
        state["last_now"] -= 1

    @job(name="t.fresh")
    async def fresh(i: int) -> None:
        state["fresh_beside_last"] += state["last_now"] > 0
        await busy_for(0.05)

    on_last_chance = [h.id for h in last.defer_many([{"i": i} for i in range(3)])]
    others = [h.id for h in fresh.defer_many([{"i": i} for i in range(3)])]
    with db.begin() as conn:
        conn.execute(
            sa.update(jobs).where(jobs.c.id.in_(on_last_chance)).values(lost_count=2),
            execution_options=db.execution_options,
        )

    drain(dataclasses.replace(FAST, concurrency=8, max_lost=3))

    assert state["last_most"] == 1
    assert state["fresh_beside_last"] >= 1
    # The ones put back while another ran were not charged an attempt.
    assert all(runs(db, job_id) == [(1, "succeeded")] for job_id in on_last_chance + others)


# ------------------------------------------------------------------ retries


def test_failed_job_is_retried_until_max_attempts_then_failed(db: Database) -> None:
    @job(name="t.flaky", max_attempts=3, backoff=0)
    def flaky() -> None:
        raise ValueError("boom")

    handle = flaky.defer()
    drain()

    row = storage.job_get(db, handle.id)
    assert row is not None
    assert (row.status, row.attempts, row.last_error) == ("failed", 3, "ValueError: boom")
    assert runs(db, handle.id) == [(1, "failed"), (2, "failed"), (3, "failed")]
    tracebacks = [r.traceback for r in storage.job_runs_list(db, handle.id)]
    assert all(t is not None and "raise ValueError" in t for t in tracebacks)


def test_job_that_succeeds_on_a_retry_ends_succeeded(db: Database) -> None:
    @job(name="t.second_time", backoff=0)
    def second_time(ctx: JobContext) -> str:
        if ctx.attempt == 1:
            raise ConnectionError("flaky network")
        return "done"

    handle = second_time.defer()
    drain()

    assert runs(db, handle.id) == [(1, "failed"), (2, "succeeded")]
    assert status(db, handle.id) == "succeeded"


@pytest.mark.parametrize(
    ("backoff", "expected_s"),
    [(30, 30.0), (lambda attempt: attempt * 100.0, 100.0)],
    ids=["seconds", "callable"],
)
def test_backoff_sets_when_the_next_attempt_is_due(
    db: Database, backoff: Any, expected_s: float
) -> None:
    @job(name="t.backoff", backoff=backoff)
    def fails() -> None:
        raise ValueError("later")

    handle = fails.defer()
    before = dt.datetime.now(dt.UTC)
    drain()

    row = storage.job_get(db, handle.id)
    assert row is not None and row.status == "queued" and row.attempts == 1
    delay = (row.run_at - before).total_seconds()
    assert expected_s - 1 <= delay <= expected_s + 5


def test_default_backoff_waits_a_few_seconds_after_the_first_failure(db: Database) -> None:
    @job(name="t.default_backoff")
    def fails() -> None:
        raise ValueError("later")

    handle = fails.defer()
    before = dt.datetime.now(dt.UTC)
    drain()

    row = storage.job_get(db, handle.id)
    assert row is not None and row.status == "queued"
    assert 1.5 <= (row.run_at - before).total_seconds() <= 10


def test_retry_exception_asks_for_its_own_delay(db: Database) -> None:
    @job(name="t.retry_me", backoff=0)
    def not_ready() -> None:
        raise Retry(delay=600)

    handle = not_ready.defer()
    before = dt.datetime.now(dt.UTC)
    drain()

    row = storage.job_get(db, handle.id)
    assert row is not None and row.status == "queued"
    assert 595 <= (row.run_at - before).total_seconds() <= 610


def test_abort_and_no_retry_exceptions_fail_at_once(db: Database) -> None:
    @job(name="t.abort", backoff=0)
    def aborts() -> None:
        raise Abort("bad input")

    @job(name="t.no_retry", backoff=0, no_retry=(PermissionError,))
    def forbidden() -> None:
        raise PermissionError("denied")

    handles = [aborts.defer(), forbidden.defer()]
    drain()

    assert [runs(db, h.id) for h in handles] == [[(1, "failed")], [(1, "failed")]]
    assert [status(db, h.id) for h in handles] == ["failed", "failed"]


def test_payload_that_does_not_decode_fails_without_retry(db: Database) -> None:
    class Opaque:
        pass

    @job(name="t.pickled_elsewhere", serializer="pickle")
    def takes_object(value: Opaque) -> None: ...

    handle = takes_object.defer(value=Opaque())
    tasklet._registry.unregister("t.pickled_elsewhere")

    @job(name="t.pickled_elsewhere")  # same name, now declared JSON: must refuse the pickle
    def takes_json(value: Opaque) -> None: ...

    drain()

    row = storage.job_get(db, handle.id)
    assert row is not None and row.status == "failed"
    assert row.last_error is not None and "refuses to unpickle" in row.last_error


# ----------------------------------------------------------------- timeouts


def test_async_job_over_its_timeout_is_cancelled_and_recorded(db: Database) -> None:
    finished: list[bool] = []

    @job(name="t.async_slow", timeout=0.2, max_attempts=1)
    async def slow() -> None:
        await anyio.sleep(30)
        finished.append(True)

    handle = slow.defer()
    drain()

    assert runs(db, handle.id) == [(1, "timed_out")]
    assert status(db, handle.id) == "failed" and finished == []


def test_sync_job_over_its_timeout_is_recorded_and_told_to_stop(db: Database) -> None:
    told: list[bool] = []

    @job(name="t.sync_slow", timeout=0.2, max_attempts=2, backoff=0)
    def slow(ctx: JobContext) -> None:
        deadline = time.monotonic() + 10
        while not ctx.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        told.append(ctx.cancelled)

    handle = slow.defer()
    drain()

    assert runs(db, handle.id) == [(1, "timed_out"), (2, "timed_out")]
    assert told == [True, True]


# ------------------------------------------------------------ long workers


def test_defer_in_this_process_wakes_an_idle_worker(db: Database) -> None:
    done = threading.Event()

    @job(name="t.wake_local")
    def wake() -> None:
        done.set()

    with BackgroundWorker(WorkerSettings(poll_s=60)) as worker:
        assert worker.idle.wait(10)  # from now on, only a wake-up can start the job
        wake.defer()
        assert done.wait(10), "an idle worker was not woken by a defer in its process"


def test_graceful_stop_puts_back_a_job_that_outlives_the_grace_period(db: Database) -> None:
    started = threading.Event()

    @job(name="t.stubborn", max_attempts=1)
    async def stubborn() -> None:
        started.set()
        await anyio.sleep(60)

    handle = stubborn.defer()
    background = BackgroundWorker(WorkerSettings(grace_s=0.2, poll_s=60))
    with background:
        assert started.wait(10)

    row = storage.job_get(db, handle.id)
    assert row is not None
    assert (row.status, row.attempts, row.locked_by) == ("queued", 0, None)
    assert runs(db, handle.id) == [(1, "interrupted")]


def test_graceful_stop_lets_a_running_job_finish_within_the_grace_period(db: Database) -> None:
    started = threading.Event()
    release = threading.Event()

    @job(name="t.finishing")
    def finishing() -> str:
        started.set()
        release.wait(10)
        return "finished"

    handle = finishing.defer()
    background = BackgroundWorker(WorkerSettings(grace_s=30, poll_s=60))
    with background as worker:
        assert started.wait(10)
        worker.stop()
        release.set()

    assert runs(db, handle.id) == [(1, "succeeded")]


def test_worker_registers_itself_while_running_and_leaves_on_stop(db: Database) -> None:
    import sqlalchemy as sa

    from tasklet.schema import workers

    def registered() -> list[str]:
        with db.begin(read_only=True) as conn:
            query = sa.select(workers.c.id)
            return list(conn.execute(query, execution_options=db.execution_options).scalars())

    with BackgroundWorker(WorkerSettings(poll_s=60)) as worker:
        assert registered() == [worker.id]
    assert registered() == []


def _terminate(db: Database, application_name: str) -> int:
    """Kill the server connections of that name, as a failover would; how many there were."""
    import sqlalchemy as sa

    with db.engine.begin() as conn:
        killed = conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = :name"
            ),
            {"name": application_name[:63]},  # what PostgreSQL keeps of a name
        ).all()
    return sum(1 for (ok,) in killed if ok)


def test_listener_reconnects_and_still_wakes_the_worker(pg_db: Database) -> None:
    done = threading.Event()

    @job(name="t.after_reconnect")
    def ran() -> None:
        done.set()

    with BackgroundWorker(WorkerSettings(poll_s=600)) as worker:
        listener = worker.listener
        assert listener is not None and listener.connected.wait(10)
        assert worker.idle.wait(10)
        assert _terminate(pg_db, listener.application_name) == 1
        wait_for(lambda: listener.connections >= 2 and listener.connected.is_set())
        assert worker.idle.wait(10)
        # Written by storage directly: no in-process wake-up, only NOTIFY can start it.
        storage.jobs_insert(pg_db, [ran.new_row(ran._options, (), {})])
        assert done.wait(10), "the reconnected listener did not wake the worker"


@pytest.fixture
def no_limited_jobs() -> Iterator[None]:
    """No job type under a concurrency limit is registered (other modules may add some)."""
    limited = [
        job for name in _registry.names() if (job := _registry.get(name)) and job.concurrency
    ]
    for limited_job in limited:
        _registry.unregister(limited_job.name)
    yield
    for limited_job in limited:
        _registry.register(limited_job)


@pytest.mark.usefixtures("no_limited_jobs")
def test_a_worker_whose_claim_connection_is_killed_claims_on_a_new_one(pg_db: Database) -> None:
    """A worker of unlimited jobs claims on an async connection named after it."""
    done = threading.Event()

    @job(name="t.after_claimer_lost")
    def ran() -> None:
        done.set()

    with BackgroundWorker(WorkerSettings(poll_s=0.1)) as worker:
        assert worker.idle.wait(10)
        assert _terminate(pg_db, f"tasklet-claimer {worker.id}") == 1
        ran.defer()
        assert done.wait(10), "the worker did not claim again after losing its connection"


def test_result_that_json_cannot_carry_is_recorded_as_null(db: Database) -> None:
    @job(name="t.odd_result")
    def odd() -> object:
        return object()

    handle = odd.defer()
    drain()

    (run,) = storage.job_runs_list(db, handle.id)
    assert (run.outcome, run.result) == ("succeeded", None)


def test_a_job_whose_notification_was_left_out_still_starts_promptly(pg_db: Database) -> None:
    started: dict[int, threading.Event] = {1: threading.Event(), 2: threading.Event()}

    @job(name="t.burst")
    def burst(n: int) -> None:
        started[n].set()

    def insert(n: int, *, notify: bool) -> None:
        storage.jobs_insert(pg_db, [burst.new_row(burst._options, (), {"n": n})], notify=notify)

    with BackgroundWorker(WorkerSettings(poll_s=600)) as worker:
        assert worker.idle.wait(10)
        insert(1, notify=True)
        assert started[1].wait(10)
        # A defer in the same burst sends no NOTIFY (tasklet._wakeup): the worker that
        # heard the burst's first notification must still find it, long before its poll.
        insert(2, notify=False)
        assert started[2].wait(5), "a job deferred without NOTIFY waited for the poll"
