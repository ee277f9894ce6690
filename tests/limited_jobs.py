"""Jobs under concurrency limits, for worker processes; import as ``tests.limited_jobs``.

Each records its start and end in $TASKLET_TEST_LOG (see tests/worker_jobs.py),
so a test can replay the file and find how many ran at once.
"""

from __future__ import annotations

import anyio

from tasklet import JobContext, job
from tests.worker_jobs import record


@job(name="tests.limited.two", queue="work", concurrency=2)
async def two_at_a_time(ctx: JobContext, seconds: float) -> None:
    record(ctx, "start")
    await anyio.sleep(seconds)
    record(ctx, "done")


@job(name="tests.limited.per_tenant", queue="work", concurrency=1, concurrency_key="tenant")
async def one_per_tenant(ctx: JobContext, tenant: str, seconds: float) -> None:
    record(ctx, f"start:{tenant}")
    await anyio.sleep(seconds)
    record(ctx, f"done:{tenant}")
