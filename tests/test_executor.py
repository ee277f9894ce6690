"""The executor alone: how a cancel or a shutdown meets an attempt that has not begun yet."""

from __future__ import annotations

import asyncio
import concurrent.futures

from tasklet import job, storage
from tasklet._executor import Attempt, Executor


def claimed_row(name: str) -> storage.ClaimedJob:
    return storage.ClaimedJob(
        id=1,
        name=name,
        queue="default",
        priority=0,
        serializer="json",
        args={},
        args_pickle=None,
        attempts=1,
        max_attempts=3,
        timeout=None,
        run_at=storage.utcnow(),
        lease=1,
    )


def outcome_when_stopped_before_the_first_step(stop: str) -> tuple[list[str], list[bool]]:
    ran: list[bool] = []

    @job(name=f"t.executor.never.{stop}")
    async def never() -> None:
        ran.append(True)

    attempt = Attempt(row=claimed_row(never.name), job=never, worker_id="w")
    outcomes: list[str] = []

    async def run_attempt(threads: concurrent.futures.ThreadPoolExecutor) -> None:
        outcomes.append((await Executor(threads).perform(attempt)).kind)

    async def claimed_then_stopped() -> None:
        with concurrent.futures.ThreadPoolExecutor(1) as threads:
            # As the worker starts an attempt, and a stop arrives before its first step.
            attempt.task = asyncio.get_running_loop().create_task(run_attempt(threads))
            attempt.request_cancel() if stop == "cancel" else attempt.interrupt()
            await attempt.task  # a task cancelled before it began would never settle

    asyncio.run(claimed_then_stopped())
    return outcomes, ran


def test_attempt_cancelled_before_its_task_began_ends_cancelled_without_calling_the_job() -> None:
    assert outcome_when_stopped_before_the_first_step("cancel") == (["cancelled"], [])


def test_attempt_interrupted_before_its_task_began_ends_interrupted_without_calling_the_job() -> (
    None
):
    assert outcome_when_stopped_before_the_first_step("shutdown") == (["interrupted"], [])
