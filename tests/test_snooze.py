"""Snooze: a job comes back later without using an attempt."""

from __future__ import annotations

import datetime as dt

import anyio
import pytest

import tasklet
from tasklet import JobContext, Snooze, job, storage
from tasklet._database import Database
from tests.support import drain, get_row, runs


def test_snoozed_job_is_queued_again_after_its_delay_without_using_an_attempt(
    db: Database,
) -> None:
    @job(name="t.snooze.later", max_attempts=1)
    def later() -> None:
        raise Snooze(60)

    handle = later.defer()
    before = dt.datetime.now(dt.UTC)
    drain()

    row = get_row(db, handle.id)
    assert (row.status, row.attempts, row.locked_by, row.finished_at) == ("queued", 0, None, None)
    assert dt.timedelta(seconds=55) < row.run_at - before < dt.timedelta(seconds=65)
    (run,) = storage.job_runs_list(db, handle.id)
    assert (run.attempt, run.outcome, run.error, run.traceback) == (1, "snoozed", None, None)


def test_async_job_can_snooze_with_a_timedelta(db: Database) -> None:
    @job(name="t.snooze.async")
    async def later() -> None:
        await anyio.sleep(0)
        raise Snooze(dt.timedelta(minutes=5))

    handle = later.defer()
    drain()

    row = get_row(db, handle.id)
    assert (row.status, row.attempts) == ("queued", 0)
    assert runs(db, handle.id) == [(1, "snoozed")]


def test_job_with_one_attempt_can_snooze_several_times_then_run(db: Database) -> None:
    seen: list[int] = []

    @job(name="t.snooze.poll", max_attempts=1)
    def poll(ctx: JobContext) -> str:
        seen.append(ctx.attempt)
        if len(seen) <= 3:
            raise Snooze(0)
        return "ready"

    handle = poll.defer()
    drain()

    assert seen == [1, 1, 1, 1]  # every run is the first (and only) attempt
    assert get_row(db, handle.id).status == "succeeded"
    assert runs(db, handle.id) == [(1, "snoozed")] * 3 + [(1, "succeeded")]


def test_snooze_runs_no_after_hook(db: Database) -> None:
    called: list[str] = []

    @job(name="t.snooze.hooks")
    def later() -> None:
        raise Snooze(60)

    later.before_perform(lambda ctx: called.append("before"))
    later.after_success(lambda ctx, result: called.append("success"))
    later.after_failure(lambda ctx, error: called.append("failure"))

    later.defer()
    drain()
    assert called == ["before"]


def test_snooze_of_a_job_whose_cancel_was_requested_cancels_it(db: Database) -> None:
    @job(name="t.snooze.cancelled")
    def later(ctx: JobContext) -> None:
        assert ctx.job_id is not None
        storage.job_cancel(db, ctx.job_id)  # as another process would, while it runs
        raise Snooze(60)

    handle = later.defer()
    drain()
    assert get_row(db, handle.id).status == "cancelled"


def test_snooze_refuses_a_negative_delay() -> None:
    with pytest.raises(ValueError, match=r"zero or more seconds.*Snooze\(0\)"):
        Snooze(-1)


def test_snooze_refuses_what_is_not_a_number_of_seconds() -> None:
    for bad in ("30", None, float("nan"), float("inf"), True):
        with pytest.raises(TypeError, match="number of seconds or a timedelta"):
            Snooze(bad)  # type: ignore[arg-type]


def test_snooze_refuses_more_than_ten_years() -> None:
    with pytest.raises(ValueError, match="defer_at"):
        Snooze(dt.timedelta(days=11 * 366))


def test_snooze_is_exported_beside_retry_and_abort() -> None:
    assert tasklet.Snooze is Snooze and {"Snooze", "Retry", "Abort"} <= set(tasklet.__all__)
