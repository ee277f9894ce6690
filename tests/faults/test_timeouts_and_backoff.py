"""Timeouts end attempts promptly and free their slot; retries keep to their backoff."""

from __future__ import annotations

import itertools
import threading

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasklet import JobContext, job, storage
from tasklet._database import Database
from tasklet.retry import BACKOFF_CAP_S, default_backoff
from tasklet.worker import Worker, WorkerSettings
from tests.support import BackgroundWorker, wait_for

pytestmark = pytest.mark.faults


def test_an_async_job_over_its_timeout_is_cancelled_within_a_second_and_frees_its_slot(
    db: Database,
) -> None:
    @job(name="faults.too_slow", timeout=0.5, max_attempts=1)
    async def too_slow() -> None:
        await anyio.sleep(30)

    @job(name="faults.next_in_line")
    async def next_in_line() -> None: ...

    slow = too_slow.defer()
    after = next_in_line.options(priority=1).defer()
    Worker(WorkerSettings(concurrency=1)).run_sync(drain=True)

    (timed_out,) = storage.job_runs_list(db, slow.id)
    assert timed_out.outcome == "timed_out" and timed_out.started_at is not None
    assert (timed_out.finished_at - timed_out.started_at).total_seconds() < 0.5 + 1.0
    (ran,) = storage.job_runs_list(db, after.id)
    assert ran.outcome == "succeeded"
    assert ran.started_at is not None and ran.started_at >= timed_out.finished_at


def test_an_always_failing_job_runs_exactly_max_attempts_times_at_its_backoff(
    db: Database,
) -> None:
    backoff_s = 0.3
    failed = threading.Event()

    @job(name="faults.always_fails", max_attempts=5, backoff=backoff_s)
    def always_fails() -> None:
        raise RuntimeError("always")

    @always_fails.after_failure
    def last(ctx: JobContext, error: BaseException) -> None:
        if ctx.will_retry is False:
            failed.set()

    handle = always_fails.defer()
    with BackgroundWorker(WorkerSettings(poll_s=30)):
        assert failed.wait(30)
        wait_for(lambda: len(storage.job_runs_list(db, handle.id)) == 5)

    runs = storage.job_runs_list(db, handle.id)
    assert [(r.attempt, r.outcome) for r in runs] == [(n, "failed") for n in range(1, 6)]
    starts = [r.started_at for r in runs if r.started_at is not None]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
    assert all(backoff_s <= gap <= backoff_s + 1.0 for gap in gaps), gaps


@given(attempt=st.integers(min_value=1, max_value=100))
def test_default_backoff_doubles_with_up_to_ten_percent_jitter_and_a_cap(attempt: int) -> None:
    base = min(BACKOFF_CAP_S, 2.0**attempt)
    assert base <= default_backoff(attempt) <= base * 1.1
