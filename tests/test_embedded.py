"""Workers inside an application's process: on its event loop (ASGI lifespan), or in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import tasklet
from tasklet import job, storage
from tasklet._database import Database
from tasklet.embedded import WorkerThread, run_worker, start_in_thread
from tasklet.worker import WorkerSettings
from tests.support import FAST, Backend, get_row, wait_for

NO_GRACE = WorkerSettings(concurrency=2, heartbeat_s=0.2, lost_after_s=1.0, sweep_s=0.2, grace_s=0)


def statuses(db: Database) -> dict[str, int]:
    return storage.jobs_count(db)


async def wait_async(condition: Any, timeout: float = 30.0) -> None:
    """Poll with a deadline without blocking the loop the worker runs on."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(condition):
        assert loop.time() < deadline, f"condition not met within {timeout}s"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------- on the event loop


def test_run_worker_runs_jobs_deferred_on_the_same_loop(db: Database) -> None:
    @job(name="embedded.double")
    async def double(n: int) -> int:
        return n * 2

    async def main() -> list[int]:
        async with run_worker(FAST) as worker:
            assert worker.started.is_set()
            handles = [await double.defer_async(n=n) for n in range(5)]
            await wait_async(lambda: statuses(db) == {"succeeded": 5})
        return [tasklet.get_runs(h.id)[0].result for h in handles]

    assert asyncio.run(main()) == [0, 2, 4, 6, 8]


def test_run_worker_raises_why_it_could_not_start(empty_backend: Backend) -> None:
    async def main() -> None:
        async with run_worker(FAST):
            raise AssertionError("the body must not run")

    with pytest.raises(tasklet.SchemaMissingError):
        asyncio.run(main())


def test_leaving_run_worker_lets_running_jobs_finish_within_the_grace_period(
    db: Database,
) -> None:
    started = threading.Event()

    @job(name="embedded.slowish")
    async def slowish() -> str:
        started.set()
        await asyncio.sleep(0.2)
        return "done"

    async def main() -> int:
        async with run_worker(FAST):
            handle = await slowish.defer_async()
            await asyncio.to_thread(started.wait, 10)
        return handle.id

    job_id = asyncio.run(main())

    assert get_row(db, job_id).status == "succeeded"


def test_leaving_run_worker_puts_jobs_still_running_after_the_grace_back(db: Database) -> None:
    started = threading.Event()

    @job(name="embedded.stuck")
    async def stuck() -> None:
        started.set()
        await asyncio.Event().wait()

    async def main() -> int:
        async with run_worker(NO_GRACE):
            handle = await stuck.defer_async()
            await asyncio.to_thread(started.wait, 10)
        return handle.id

    job_id = asyncio.run(main())

    row = get_row(db, job_id)
    assert (row.status, row.attempts, row.locked_by) == ("queued", 0, None)
    assert [r.outcome for r in tasklet.get_runs(job_id)] == ["interrupted"]


# ------------------------------------------------------------------ in a thread


def test_worker_thread_runs_jobs_until_stopped(db: Database) -> None:
    @job(name="embedded.threaded")
    def threaded(n: int) -> int:
        return n + 1

    thread = start_in_thread(FAST, stop_at_exit=False)
    try:
        threaded.defer_many([{"n": n} for n in range(10)])
        wait_for(lambda: statuses(db) == {"succeeded": 10})
    finally:
        stats = thread.stop()

    assert not thread.alive
    assert stats is not None and stats.outcomes == {"succeeded": 10}


def test_worker_thread_start_raises_why_it_could_not_start(empty_backend: Backend) -> None:
    thread = WorkerThread(FAST)

    with pytest.raises(tasklet.SchemaMissingError):
        thread.start()
    assert not thread.alive


def test_stopping_a_worker_thread_puts_unfinished_sync_jobs_back(db: Database) -> None:
    started, release = threading.Event(), threading.Event()

    @job(name="embedded.blocked")
    def blocked() -> None:
        started.set()
        release.wait(10)

    handle = blocked.defer()
    with WorkerThread(NO_GRACE):
        assert started.wait(10)
    release.set()

    row = get_row(db, handle.id)
    assert (row.status, row.attempts) == ("queued", 0)


# ----------------------------------------------------------------- an ASGI app


def signup_app(settings: WorkerSettings) -> Starlette:
    @job(name="embedded.welcome")
    async def welcome(user_id: int) -> str:
        await asyncio.sleep(0.02)
        return f"welcome {user_id}"

    async def signup(request: Request) -> JSONResponse:
        body = await request.json()
        handle = await welcome.defer_async(user_id=body["user_id"])
        return JSONResponse({"job": handle.id}, status_code=201)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with run_worker(settings):
            yield

    return Starlette(routes=[Route("/signup", signup, methods=["POST"])], lifespan=lifespan)


async def serve(app: Starlette, signups: int, until: Any = None) -> list[int]:
    """Start the app as an ASGI server does (lifespan), post signups, then shut it down."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://app") as client,
    ):
        ids = []
        for n in range(signups):
            response = await client.post("/signup", json={"user_id": n})
            assert response.status_code == 201
            ids.append(response.json()["job"])
        if until is not None:
            await wait_async(until)
    return ids


def test_an_app_runs_the_jobs_its_requests_defer(db: Database) -> None:
    ids = asyncio.run(serve(signup_app(FAST), 20, lambda: statuses(db) == {"succeeded": 20}))

    assert [tasklet.get_runs(i)[0].result for i in ids[:2]] == ["welcome 0", "welcome 1"]


def test_shutting_an_app_down_loses_no_job(db: Database) -> None:
    ids = asyncio.run(serve(signup_app(NO_GRACE), 50))
    # Shut down with no grace: some jobs ran, the rest wait in the queue, none is running.
    after = statuses(db)
    assert set(after) <= {"succeeded", "queued"} and sum(after.values()) == 50

    tasklet.Worker(FAST).run_sync(drain=True)

    for job_id in ids:
        runs = [r.outcome for r in tasklet.get_runs(job_id)]
        assert runs.count("succeeded") == 1 and set(runs) <= {"succeeded", "interrupted"}


EXITING_SCRIPT = """
import sys, time
import tasklet
from tasklet import job

@job(name="embedded.exit_job")
def exit_job(n: int) -> int:
    time.sleep(0.01)
    return n

tasklet.start_in_thread(tasklet.WorkerSettings(concurrency=4, grace_s=10))
exit_job.defer_many([{"n": n} for n in range(40)])
time.sleep(float(sys.argv[1]))  # let some jobs start: the program ends while they run
"""


@pytest.mark.slow
@pytest.mark.parametrize("runs_for", [0.0, 0.05])
def test_a_worker_thread_stops_gracefully_when_the_program_ends(
    backend: Backend, tmp_path: Path, runs_for: float
) -> None:
    script = tmp_path / "script.py"
    script.write_text(EXITING_SCRIPT)

    done = subprocess.run(
        [sys.executable, str(script), str(runs_for)],
        env=backend.env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    db = tasklet._config.database()
    counts = storage.jobs_count(db)
    # Stopped before the thread pools were: no attempt failed, none is left running.
    assert set(counts) <= {"succeeded", "queued"} and sum(counts.values()) == 40, done.stderr
    failed = [
        r for j in storage.jobs_list(db) for r in tasklet.get_runs(j.id) if r.outcome == "failed"
    ]
    assert failed == []
