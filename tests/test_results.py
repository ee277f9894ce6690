"""Waiting for results: values come back decoded, failures only once final, wake-ups prompt."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
import time
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

import tasklet
from tasklet import JobCancelled, JobFailed, JobNotFoundError, job, results, storage
from tasklet._database import Database
from tasklet.schema import jobs
from tasklet.storage._sql import done_channel, done_listener, stamp
from tasklet.worker import WorkerSettings
from tests.support import REPO, Backend, BackgroundWorker, get_row

FAST = WorkerSettings(concurrency=8, heartbeat_s=0.2, lost_after_s=1.0, sweep_s=0.2, grace_s=5)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_result_returns_what_a_sync_job_returned(db: Database) -> None:
    @job(name="res.add")
    def add(a: int, b: int) -> int:
        return a + b

    with BackgroundWorker(FAST):
        assert add.defer(a=2, b=3).result(timeout=10) == 5


@pytest.mark.anyio
async def test_result_async_returns_an_async_jobs_value_decoded_as_arguments_are(
    db: Database,
) -> None:
    @job(name="res.rich")
    async def rich() -> dict[str, Any]:
        return {"when": dt.date(2027, 1, 1), "pair": (1, 2), "cost": Decimal("9.99")}

    with BackgroundWorker(FAST):
        handle = await rich.defer_async()
        value = await handle.result_async(timeout=10)

    assert value == {"when": dt.date(2027, 1, 1), "pair": (1, 2), "cost": Decimal("9.99")}


def test_failure_is_raised_only_after_the_last_attempt(db: Database) -> None:
    @job(name="res.broken", max_attempts=3, backoff=0)
    def broken() -> None:
        raise ValueError("no such account")

    with BackgroundWorker(FAST):
        handle = broken.defer()
        with pytest.raises(JobFailed) as raised:
            handle.result(timeout=10)

    assert [r.outcome for r in tasklet.get_runs(handle.id)] == ["failed"] * 3
    error = raised.value
    assert (error.job_id, error.error) == (handle.id, "ValueError: no such account")
    assert error.traceback is not None and "in broken" in error.traceback
    assert "no such account" in str(error)


def test_a_job_that_succeeds_on_a_retry_returns_its_value(db: Database) -> None:
    attempts: list[int] = []

    @job(name="res.shaky", max_attempts=3, backoff=0)
    def shaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("flaky")
        return "ok"

    with BackgroundWorker(FAST):
        assert shaky.defer().result(timeout=10) == "ok"


def test_result_times_out_while_the_job_is_not_done(db: Database) -> None:
    @job(name="res.never_run")
    def never_run() -> None: ...

    handle = never_run.defer()
    began = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not finish within 0.2s \(it is queued\)"):
        handle.result(timeout=0.2)
    assert time.monotonic() - began < 2


@pytest.mark.anyio
async def test_result_async_times_out_too(db: Database) -> None:
    @job(name="res.never_run_async")
    def never_run() -> None: ...

    handle = never_run.defer()
    with pytest.raises(TimeoutError):
        await handle.result_async(timeout=0.2)


def test_a_cancelled_job_raises_job_cancelled(db: Database) -> None:
    @job(name="res.to_cancel")
    def to_cancel() -> None: ...

    handle = to_cancel.defer()
    with db.begin() as conn:
        cancel = (
            sa.update(jobs)
            .where(jobs.c.id == handle.id)
            .values(status="cancelled", finished_at=stamp(conn, storage.utcnow()))
        )
        conn.execute(cancel, execution_options=db.execution_options)

    with pytest.raises(JobCancelled, match=f"job {handle.id} was cancelled"):
        handle.result(timeout=10)


def test_a_handle_is_rebuilt_from_an_id(db: Database) -> None:
    @job(name="res.echo")
    def echo(value: str) -> str:
        return value

    job_id = echo.defer(value="hi").id
    with BackgroundWorker(FAST):
        rebuilt = tasklet.handle(job_id)
        assert (rebuilt.name, rebuilt.result(timeout=10)) == ("res.echo", "hi")


def test_a_job_that_does_not_exist_raises_job_not_found(db: Database) -> None:
    with pytest.raises(JobNotFoundError, match="retention"):
        tasklet.handle(12345)
    with pytest.raises(LookupError):
        tasklet.JobHandle(id=12345, name="gone").result(timeout=1)


def test_bad_timeouts_are_refused(db: Database) -> None:
    with pytest.raises(ValueError, match="timeout must be zero or more"):
        tasklet.JobHandle(id=1, name="x").result(timeout=-1)


def test_many_waiters_in_many_threads_share_one_watcher(db: Database) -> None:
    @job(name="res.square")
    def square(n: int) -> int:
        return n * n

    handles = square.defer_many([{"n": n} for n in range(40)])
    got: dict[int, int] = {}
    errors: list[BaseException] = []

    def waiter(index: int) -> None:
        try:
            got[index] = handles[index % len(handles)].result(timeout=20)
        except BaseException as exc:
            errors.append(exc)

    before = set(threading.enumerate())
    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(80)]
    for thread in threads:
        thread.start()
    with BackgroundWorker(FAST):
        for thread in threads:
            thread.join(30)

    assert errors == []
    assert got == {i: (i % 40) ** 2 for i in range(80)}
    watchers = [t for t in set(threading.enumerate()) - before if t.name == "tasklet-results"]
    assert len(watchers) == 1


def test_a_waiter_in_another_process_gets_the_result(backend: Backend, db: Database) -> None:
    @job(name="res.answer")
    def add(a: int, b: int) -> int:
        return a + b

    handle = add.defer(a=20, b=22)
    script = (
        "import tasklet, sys; "
        f"print(tasklet.handle({handle.id}).result(timeout=30)); sys.stdout.flush()"
    )
    waiter = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, env=backend.env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with BackgroundWorker(FAST):
            out, err = waiter.communicate(timeout=60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
    assert (waiter.returncode, out.strip()) == (0, "42"), err


def test_a_waiter_is_woken_promptly_even_with_a_long_poll(db: Database) -> None:
    release = threading.Event()

    @job(name="res.gated")
    def gated() -> str:
        assert release.wait(20)
        return "done"

    handle = gated.defer()
    outcome: list[Any] = []
    waiter = threading.Thread(target=lambda: outcome.append(handle.result(20, poll_s=600)))
    with BackgroundWorker(FAST):
        waiter.start()
        assert results.watcher_ready(db, 10)
        time.sleep(0.3)  # let the watcher settle into its longest wait (not synchronisation)
        release.set()
        began = time.monotonic()
        waiter.join(20)
        woke_after = time.monotonic() - began

    assert outcome == ["done"]
    assert woke_after < 2.0, f"woke after {woke_after:.2f}s: the poll, not a wake-up"


# ------------------------------------------------------------------ the finish notification


def _claimed(db: Database, n: int) -> list[storage.ClaimedJob]:
    @job(name="res.n")
    def n_job(i: int = 0) -> None: ...

    n_job.defer_many([{"i": i} for i in range(n)])
    return storage.jobs_claim(db, worker_id="w", queues=None, names=["res.n"], limit=n)


def _completion(row: storage.ClaimedJob, status: str) -> storage.Completion:
    now = storage.utcnow()
    return storage.Completion(
        job_id=row.id, lease=row.lease, attempt=row.attempts, worker_id="w", status=status,
        outcome="succeeded" if status == "succeeded" else "failed",
        started_at=now, finished_at=now,
    )  # fmt: skip


def _notifications(db: Database, action: Any, *, waiting: bool = True) -> list[str]:
    """What a listener hears while ``action`` runs; ``waiting``: it is named as a watcher."""
    import psycopg

    name = done_listener(db.schema) if waiting else "someone else"
    with psycopg.connect(db.conninfo, autocommit=True, application_name=name) as conn:
        conn.execute(f'LISTEN "{done_channel(db.schema)}"')
        action()
        return [n.payload for n in conn.notifies(timeout=0.5)]


def test_a_finish_batch_sends_one_notification_with_its_finished_ids(pg_db: Database) -> None:
    rows = _claimed(pg_db, 4)
    batch = [_completion(r, "succeeded") for r in rows[:2]]
    batch += [_completion(rows[2], "failed"), _completion(rows[3], "queued")]

    payloads = _notifications(pg_db, lambda: storage.jobs_finish(pg_db, batch))

    assert len(payloads) == 1
    assert sorted(int(i) for i in payloads[0].split(",")) == sorted(r.id for r in rows[:3])


def test_a_finish_batch_of_retries_only_sends_no_notification(pg_db: Database) -> None:
    rows = _claimed(pg_db, 3)
    batch = [_completion(r, "queued") for r in rows]

    assert _notifications(pg_db, lambda: storage.jobs_finish(pg_db, batch)) == []


def test_a_batch_too_large_for_one_payload_notifies_without_ids(pg_db: Database) -> None:
    rows = _claimed(pg_db, 2000)
    batch = [_completion(r, "succeeded") for r in rows]

    assert _notifications(pg_db, lambda: storage.jobs_finish(pg_db, batch)) == [""]


def test_finishes_send_no_notification_while_no_process_waits(pg_db: Database) -> None:
    rows = _claimed(pg_db, 2)
    batch = [_completion(r, "succeeded") for r in rows]

    heard = _notifications(pg_db, lambda: storage.jobs_finish(pg_db, batch), waiting=False)

    assert heard == []
    assert {get_row(pg_db, r.id).status for r in rows} == {"succeeded"}


def test_a_job_deleted_while_awaited_raises_job_not_found(db: Database) -> None:
    @job(name="res.doomed")
    def doomed() -> None: ...

    handle = doomed.defer()
    failure: list[BaseException] = []

    def waiter() -> None:
        try:
            handle.result(timeout=20, poll_s=0.05)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    storage.jobs_clear(db, queues=None)
    thread.join(20)

    assert len(failure) == 1 and isinstance(failure[0], JobNotFoundError)


@pytest.mark.anyio
async def test_many_async_waiters_on_one_loop_get_their_results(db: Database) -> None:
    import asyncio

    @job(name="res.double")
    async def double(n: int) -> int:
        return 2 * n

    handles = await double.defer_many_async([{"n": n} for n in range(30)])
    with BackgroundWorker(FAST):
        values = await asyncio.gather(*(h.result_async(timeout=20) for h in handles))

    assert values == [2 * n for n in range(30)]


def test_the_listener_reconnects_and_still_wakes_waiters(pg_db: Database) -> None:
    release = threading.Event()

    @job(name="res.after_reconnect")
    def gated() -> str:
        assert release.wait(20)
        return "done"

    handle = gated.defer()
    outcome: list[Any] = []
    waiter = threading.Thread(target=lambda: outcome.append(handle.result(20, poll_s=600)))
    with BackgroundWorker(FAST):
        waiter.start()
        assert results.watcher_ready(pg_db, 10)
        with pg_db.engine.begin() as conn:
            killed = conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = :name"
                ),
                {"name": done_listener(pg_db.schema)},
            ).all()
        assert killed == [(True,)]
        release.set()
        waiter.join(20)

    assert outcome == ["done"]
