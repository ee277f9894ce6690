"""The jobs of examples/quickstart.py: one sync, one async, one that fails once."""

from __future__ import annotations

import anyio

from tasklet import JobContext, job


@job(queue="email", max_attempts=5)
def send_welcome(user_id: int) -> str:
    # A real job would call an email API here; sync jobs run in worker threads.
    return f"welcome mail queued for user {user_id}"


@job(timeout=30)
async def fetch_profile(ctx: JobContext, user_id: int) -> dict[str, object]:
    # Async jobs run on the worker's event loop.
    await anyio.sleep(0.01)
    return {"user_id": user_id, "attempt": ctx.attempt}


@job(max_attempts=3, backoff=0)
def shaky(ctx: JobContext) -> str:
    if ctx.attempt == 1:
        raise ConnectionError("the third party hung up; tasklet will retry")
    return "ok on attempt 2"


@send_welcome.after_success
def audit(ctx: JobContext, result: object) -> None:
    print(f"  [hook] job {ctx.job_id} ({ctx.name}) succeeded: {result}")
