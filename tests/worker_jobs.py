"""Jobs for tests that run workers in other processes; import as ``tests.worker_jobs``.

Each job appends a line to the file named by $TASKLET_TEST_LOG, outside any
database transaction, so a test can count how many times each job really ran.
"""

from __future__ import annotations

import os

import anyio

from tasklet import JobContext, job


def record(ctx: JobContext, event: str) -> None:
    line = f"{ctx.job_id} {ctx.attempt} {event} {os.getpid()}\n".encode()
    fd = os.open(os.environ["TASKLET_TEST_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one small O_APPEND write: lines of concurrent writers never mix
    finally:
        os.close(fd)


@job(name="tests.worker.count", queue="work")
def count(ctx: JobContext, n: int) -> int:
    record(ctx, "done")
    return n


def started_before(job_id: int | None) -> bool:
    try:
        with open(os.environ["TASKLET_TEST_LOG"]) as log:
            return any(line.split()[:3:2] == [str(job_id), "start"] for line in log)
    except FileNotFoundError:
        return False


@job(name="tests.worker.nap", queue="work", max_attempts=3)
async def nap(ctx: JobContext, first_run_s: float, later_runs_s: float = 0.0) -> None:
    """Sleeps ``first_run_s`` the first time it runs, ``later_runs_s`` after."""
    first = not started_before(ctx.job_id)
    record(ctx, "start")
    await anyio.sleep(first_run_s if first else later_runs_s)
    record(ctx, "done")


@job(name="tests.worker.crash", queue="work")
def crash() -> None:
    """Kills its worker process, as a segfaulting C extension or an OOM kill would."""
    os._exit(1)
