"""The executor alone: how a cancel request meets an attempt that has not begun yet."""

from __future__ import annotations

import asyncio
import concurrent.futures

from tasklet import job, storage
from tasklet._executor import Attempt, Executor


def test_attempt_cancelled_before_its_task_began_ends_cancelled_without_calling_the_job() -> None:
    ran: list[bool] = []

    @job(name="t.executor.never")
    async def never() -> None:
        ran.append(True)

    row = storage.ClaimedJob(
        id=1,
        name="t.executor.never",
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
    attempt = Attempt(row=row, job=never, worker_id="w")
    outcomes: list[str] = []

    async def run_attempt(threads: concurrent.futures.ThreadPoolExecutor) -> None:
        outcomes.append((await Executor(threads).perform(attempt)).kind)

    async def claimed_then_cancelled() -> None:
        with concurrent.futures.ThreadPoolExecutor(1) as threads:
            # As the worker starts an attempt, and a cancel arrives before its first step.
            attempt.task = asyncio.get_running_loop().create_task(run_attempt(threads))
            attempt.request_cancel()
            await attempt.task  # a task cancelled before it began would never settle

    asyncio.run(claimed_then_cancelled())
    assert (outcomes, ran) == (["cancelled"], [])
