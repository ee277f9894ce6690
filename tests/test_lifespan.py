"""Worker state: opened once per worker before any job, handed to jobs, closed after the last."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import tasklet
from tasklet import JobContext, job, lifespan, storage
from tasklet._database import Database
from tasklet.schema import workers
from tests.support import FAST, Backend, BackgroundWorker, Log, drain, finish, tasklet_process


@pytest.fixture(autouse=True)
def _forget_lifespans() -> Iterator[None]:
    before = lifespan.registered()
    yield
    for func in lifespan.registered():
        if func not in before:
            lifespan.forget(func)


def test_jobs_get_what_an_async_lifespan_yielded(db: Database) -> None:
    seen: list[object] = []
    client = object()

    @tasklet.worker_lifespan
    async def resources() -> AsyncIterator[dict[str, Any]]:
        yield {"http": client}

    @job(name="ls.uses_http")
    async def uses_http(ctx: JobContext) -> None:
        seen.append(ctx.state["http"])

    uses_http.defer()
    drain()

    assert seen == [client]


def test_sync_jobs_get_what_a_sync_lifespan_yielded(db: Database) -> None:
    seen: list[object] = []

    @tasklet.worker_lifespan
    def resources() -> Iterator[dict[str, Any]]:
        yield {"pool": "the pool"}

    @job(name="ls.uses_pool")
    def uses_pool(ctx: JobContext) -> None:
        seen.append(ctx.state["pool"])

    uses_pool.defer()
    drain()

    assert seen == ["the pool"]


def test_state_is_created_once_per_worker_and_shared_by_its_jobs(db: Database) -> None:
    opened: list[object] = []
    seen: list[object] = []

    @tasklet.worker_lifespan
    async def resources() -> AsyncIterator[dict[str, Any]]:
        resource = object()
        opened.append(resource)
        yield {"r": resource}

    @job(name="ls.shared")
    def shared(ctx: JobContext, n: int) -> None:
        seen.append(ctx.state["r"])

    shared.defer_many([{"n": n} for n in range(10)])
    drain()

    assert len(opened) == 1
    assert seen == opened * 10


def test_lifespans_open_in_order_and_close_in_reverse_after_the_last_job(db: Database) -> None:
    events: list[str] = []
    started, release = threading.Event(), threading.Event()

    @tasklet.worker_lifespan
    async def first() -> AsyncIterator[dict[str, Any]]:
        events.append("open first")
        yield {"first": 1}
        events.append("close first")

    @tasklet.worker_lifespan
    def second() -> Iterator[dict[str, Any]]:
        events.append("open second")
        yield {"second": 2}
        events.append("close second")

    @job(name="ls.slow")
    def slow(ctx: JobContext) -> None:
        events.append("job started")
        started.set()
        assert release.wait(10)
        events.append(f"job done with {dict(ctx.state)}")

    slow.defer()
    with BackgroundWorker(FAST) as worker:
        assert started.wait(10)
        worker.stop()  # a graceful stop: the running job finishes first
        release.set()

    assert events == [
        "open first",
        "open second",
        "job started",
        "job done with {'first': 1, 'second': 2}",
        "close second",
        "close first",
    ]


def test_state_opens_before_the_worker_registers(db: Database) -> None:
    registered_at_startup: list[int] = []

    @tasklet.worker_lifespan
    def resources() -> Iterator[None]:
        with db.begin(read_only=True) as conn:
            count = sa.select(sa.func.count()).select_from(workers)
            registered_at_startup.append(
                conn.execute(count, execution_options=db.execution_options).scalar_one()
            )
        yield None

    drain()

    assert registered_at_startup == [0]


def test_a_lifespan_that_fails_to_start_stops_the_worker_before_any_job(
    db: Database,
) -> None:
    closed: list[str] = []

    @tasklet.worker_lifespan
    async def fine() -> AsyncIterator[None]:
        yield None
        closed.append("fine")

    @tasklet.worker_lifespan
    async def broken() -> AsyncIterator[dict[str, Any]]:
        raise ConnectionError("database pool unreachable")
        yield {}  # pragma: no cover

    @job(name="ls.never")
    def never() -> None: ...

    handle = never.defer()
    with pytest.raises(tasklet.WorkerStartupError) as raised:
        drain()

    message = str(raised.value)
    assert "broken failed while starting: ConnectionError: database pool unreachable" in message
    assert "took no jobs" in message
    assert isinstance(raised.value.__cause__, ConnectionError)
    assert closed == ["fine"]  # what did open is closed again
    row = storage.job_get(db, handle.id)
    assert row is not None and (row.status, row.attempts) == ("queued", 0)
    assert storage.jobs_count(db) == {"queued": 1}


def test_a_lifespan_that_fails_to_close_is_logged_and_the_worker_still_stops(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    @tasklet.worker_lifespan
    def leaky() -> Iterator[None]:
        yield None
        raise RuntimeError("close failed")

    drain()

    assert "leaky raised while shutting down" in caplog.text


def test_a_lifespan_must_yield_a_mapping(db: Database) -> None:
    @tasklet.worker_lifespan
    async def wrong() -> AsyncIterator[list[int]]:
        yield [1, 2]

    with pytest.raises(tasklet.WorkerStartupError, match="yield a mapping"):
        drain()


def test_two_lifespans_cannot_yield_the_same_name(db: Database) -> None:
    @tasklet.worker_lifespan
    def one() -> Iterator[dict[str, int]]:
        yield {"db": 1}

    @tasklet.worker_lifespan
    def two() -> Iterator[dict[str, int]]:
        yield {"db": 2}

    with pytest.raises(tasklet.WorkerStartupError, match="'db', which another lifespan"):
        drain()


def test_only_generator_functions_are_lifespans() -> None:
    with pytest.raises(TypeError, match="generator function that yields the state once"):
        tasklet.worker_lifespan(lambda: {"a": 1})


def test_a_missing_name_says_where_state_comes_from(db: Database) -> None:
    errors: list[str] = []

    @tasklet.worker_lifespan
    def resources() -> Iterator[dict[str, int]]:
        yield {"db": 1}

    @job(name="ls.missing")
    def missing(ctx: JobContext) -> None:
        try:
            ctx.state["http"]
        except KeyError as exc:
            errors.append(str(exc))

    missing.defer()
    drain()

    assert "no 'http' (it has 'db')" in errors[0]
    assert "@tasklet.worker_lifespan" in errors[0]


def test_an_inline_call_has_an_empty_state() -> None:
    @job(name="ls.inline")
    def inline(ctx: JobContext) -> int:
        return len(ctx.state)

    assert inline() == 0


@pytest.mark.slow
def test_the_worker_command_exits_with_the_startup_error(
    backend: Backend, log: Log, tmp_path: Path
) -> None:
    process = tasklet_process(backend, log, "workoff", "--import", "tests.lifespan_for_tests")
    code, output = finish(process)

    assert code == 1
    assert "worker lifespan tests.lifespan_for_tests.unreachable failed while starting" in output
    assert "Traceback" not in output
