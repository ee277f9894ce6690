"""The ``@job`` decorator and every way of deferring a job, on SQLite and on PostgreSQL."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from tasklet import Job, JobContext, JobDefinitionError, _registry, job
from tasklet._database import Database
from tasklet.schema import jobs
from tests.support import Backend, count_jobs, get_row

UTC = dt.UTC
#: Clock rounding between Python and the database (microseconds, float seconds).
SLACK = dt.timedelta(milliseconds=1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.contextmanager
def count_inserts(db: Database) -> Iterator[list[str]]:
    """The INSERT statements the database runs inside the block (each set of an executemany)."""
    seen: list[str] = []

    def record(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        if "INSERT INTO" not in statement.upper():
            return
        # An executemany runs the statement once per parameter set; SQLAlchemy's batched
        # "insertmanyvalues" also reports many=True but sends one flat set for one statement.
        sets = list(parameters) if many else [parameters]
        if sets and not isinstance(sets[0], tuple | list | dict):
            sets = [parameters]
        seen.extend(statement for _ in sets)

    # Enqueues that commit at once run on tasklet's autocommit engine.
    engines = {db.engine, db.autocommit_engine}
    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)


@contextlib.asynccontextmanager
async def user_async_engine(backend: Backend) -> AsyncIterator[AsyncEngine]:
    """The application's own async engine on the test database (not tasklet's)."""
    url = sa.make_url(backend.url)
    if url.get_backend_name() == "sqlite":
        url = url.set(drivername="sqlite+aiosqlite")
    engine = create_async_engine(url)
    try:
        yield engine
    finally:
        await engine.dispose()


#: Counts the jobs a given connection or session can see.
COUNT_JOBS = sa.select(sa.func.count()).select_from(jobs)


# ----------------------------------------------------------------- declaring


def test_bare_decorator_makes_a_job_with_the_default_options() -> None:
    @job
    def resize(image_id: int) -> None: ...

    assert isinstance(resize, Job)
    assert (resize.queue, resize.max_attempts, resize.priority) == ("default", 20, 0)
    assert (resize.timeout, resize.backoff, resize.serializer) == (None, None, "json")
    assert _registry.get(resize.name) is resize


def test_bare_decorator_accepts_an_async_function() -> None:
    @job
    async def resize(image_id: int) -> None: ...

    assert resize.is_async
    assert _registry.get(resize.name) is resize


def test_decorator_arguments_are_stored_on_the_job() -> None:
    @job(
        queue="email",
        max_attempts=5,
        priority=-3,
        name="billing.send_invoice",
        timeout=2.5,
        backoff=7,
        serializer="pickle",
    )
    async def send_invoice(invoice_id: int) -> None: ...

    assert send_invoice.is_async
    assert (send_invoice.queue, send_invoice.max_attempts, send_invoice.priority) == (
        "email",
        5,
        -3,
    )
    assert (send_invoice.name, send_invoice.timeout) == ("billing.send_invoice", 2.5)
    assert (send_invoice.backoff, send_invoice.serializer) == (7, "pickle")
    assert _registry.get("billing.send_invoice") is send_invoice


def test_backoff_may_be_a_function_of_the_attempt() -> None:
    def backoff(attempt: int) -> float:
        return 2.0**attempt

    @job(backoff=backoff)
    def resize(image_id: int) -> None: ...

    assert resize.backoff is backoff


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"queue": ""}, "queue"),
        ({"serializer": "yaml"}, "serializer"),
        ({"backoff": -1}, "backoff"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -5}, "timeout"),
    ],
    ids=[
        "max_attempts=0",
        "empty-queue",
        "bad-serializer",
        "negative-backoff",
        "timeout=0",
        "timeout<0",
    ],
)
def test_invalid_decorator_option_is_refused_naming_the_option(
    options: dict[str, Any], complaint: str
) -> None:
    def resize(image_id: int) -> None: ...

    with pytest.raises(JobDefinitionError, match=complaint):
        job(**options)(resize)
    assert not [name for name in _registry.names() if "resize" in name]


def test_calling_a_sync_job_runs_it_inline_and_returns_its_result() -> None:
    calls: list[tuple[int, int]] = []

    @job
    def add(a: int, b: int) -> int:
        calls.append((a, b))
        return a + b

    assert add(2, b=3) == 5
    assert calls == [(2, 3)]


@pytest.mark.anyio
async def test_awaiting_an_async_job_runs_it_inline_and_returns_its_result() -> None:
    @job
    async def add(a: int, b: int) -> int:
        return a + b

    assert await add(2, b=3) == 5


def test_context_parameter_gets_an_inline_context_when_called_directly() -> None:
    @job(queue="email", max_attempts=4, name="test_job.whoami")
    def whoami(ctx: JobContext, greeting: str) -> tuple[JobContext, str]:
        return ctx, greeting

    ctx, greeting = whoami(greeting="hi")

    assert greeting == "hi"
    assert isinstance(ctx, JobContext)
    assert (ctx.job_id, ctx.name, ctx.queue) == (None, "test_job.whoami", "email")
    assert (ctx.attempt, ctx.max_attempts) == (1, 4)


@pytest.mark.anyio
async def test_async_job_context_parameter_gets_an_inline_context_when_awaited_directly() -> None:
    @job(name="test_job.whoami_async")
    async def whoami(ctx: JobContext, greeting: str) -> JobContext:
        return ctx

    ctx = await whoami(greeting="hi")

    assert (ctx.job_id, ctx.name) == (None, "test_job.whoami_async")


def test_context_parameter_is_not_a_deferred_argument(db: Database) -> None:
    @job(name="test_job.greet")
    def greet(ctx: JobContext, greeting: str) -> None: ...

    handle = greet.defer(greeting="hi")

    assert get_row(db, handle.id).args == {"greeting": "hi"}


def test_name_defaults_to_module_and_qualname() -> None:
    @job
    def send_report(day: str) -> None: ...

    assert send_report.name == (
        f"{__name__}.test_name_defaults_to_module_and_qualname.<locals>.send_report"
    )


def test_job_defined_in_main_without_a_name_is_refused() -> None:
    def orphan() -> None: ...

    orphan.__module__ = "__main__"

    with pytest.raises(JobDefinitionError, match="__main__"):
        job(orphan)
    assert not [name for name in _registry.names() if "orphan" in name]


def test_job_defined_in_main_with_an_explicit_name_is_accepted() -> None:
    def orphan() -> None: ...

    orphan.__module__ = "__main__"

    assert job(name="test_job.adopted")(orphan).name == "test_job.adopted"


def test_two_functions_with_the_same_name_are_refused() -> None:
    @job(name="test_job.clash")
    def first() -> None: ...

    def second() -> None: ...

    with pytest.raises(JobDefinitionError, match=r"test_job\.clash"):
        job(name="test_job.clash")(second)
    assert _registry.get("test_job.clash") is first


# ------------------------------------------------------------------ deferring


def test_defer_returns_a_handle_whose_id_is_the_stored_row(db: Database) -> None:
    @job(name="test_job.welcome")
    def welcome(user_id: int) -> None: ...

    first = welcome.defer(user_id=5)
    second = welcome.defer(user_id=6)

    assert first.id != second.id
    assert first.name == "test_job.welcome"
    row = get_row(db, first.id)
    assert (row.id, row.name, row.status, row.args) == (
        first.id,
        "test_job.welcome",
        "queued",
        {"user_id": 5},
    )
    assert get_row(db, second.id).args == {"user_id": 6}


def test_defer_stores_positional_arguments_by_parameter_name(db: Database) -> None:
    @job
    def add(a: int, b: int) -> None: ...

    handle = add.defer(1, 2)

    assert get_row(db, handle.id).args == {"a": 1, "b": 2}


def test_defer_stores_the_job_options_on_the_row(db: Database) -> None:
    @job(queue="email", priority=-2, max_attempts=3, timeout=9.5)
    def welcome(user_id: int) -> None: ...

    row = get_row(db, welcome.defer(user_id=5).id)

    assert (row.queue, row.priority, row.max_attempts, row.timeout, row.serializer) == (
        "email",
        -2,
        3,
        9.5,
        "json",
    )
    assert row.attempts == 0


def test_defer_makes_the_job_due_now(db: Database) -> None:
    @job
    def ping() -> None: ...

    before = dt.datetime.now(UTC)
    row = get_row(db, ping.defer().id)
    after = dt.datetime.now(UTC)

    assert before - SLACK <= row.run_at <= after + SLACK


def test_defer_at_stores_run_at_equal_to_the_given_time(db: Database) -> None:
    @job
    def ping() -> None: ...

    when = dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))

    row = get_row(db, ping.defer_at(when).id)

    assert row.run_at == when


def test_defer_at_refuses_a_naive_datetime_saying_it_needs_a_timezone(db: Database) -> None:
    @job
    def ping() -> None: ...

    with pytest.raises(ValueError, match="timezone-aware"):
        ping.defer_at(dt.datetime(2031, 5, 6, 7, 8, 9))
    assert count_jobs(db) == 0


def test_defer_in_a_timedelta_stores_run_at_now_plus_the_delay(db: Database) -> None:
    @job
    def ping() -> None: ...

    delay = dt.timedelta(hours=1, milliseconds=250)
    before = dt.datetime.now(UTC)
    handle = ping.defer_in(delay)
    after = dt.datetime.now(UTC)

    assert before + delay - SLACK <= get_row(db, handle.id).run_at <= after + delay + SLACK


def test_defer_in_seconds_stores_run_at_now_plus_the_delay(db: Database) -> None:
    @job
    def ping() -> None: ...

    before = dt.datetime.now(UTC)
    handle = ping.defer_in(90.5)
    after = dt.datetime.now(UTC)

    delay = dt.timedelta(seconds=90.5)
    assert before + delay - SLACK <= get_row(db, handle.id).run_at <= after + delay + SLACK


def test_defer_in_refuses_a_negative_delay(db: Database) -> None:
    @job
    def ping() -> None: ...

    with pytest.raises(ValueError, match="delay"):
        ping.defer_in(-1)
    assert count_jobs(db) == 0


def test_options_override_queue_priority_and_max_attempts_for_one_enqueue(db: Database) -> None:
    @job(queue="email", priority=0, max_attempts=5)
    def welcome(user_id: int) -> None: ...

    urgent = get_row(
        db, welcome.options(queue="now", priority=-9, max_attempts=2).defer(user_id=1).id
    )
    plain = get_row(db, welcome.defer(user_id=2).id)

    assert (urgent.queue, urgent.priority, urgent.max_attempts) == ("now", -9, 2)
    assert (plain.queue, plain.priority, plain.max_attempts) == ("email", 0, 5)
    assert (welcome.queue, welcome.priority, welcome.max_attempts) == ("email", 0, 5)


def test_options_refuses_an_invalid_value() -> None:
    @job
    def welcome(user_id: int) -> None: ...

    with pytest.raises(ValueError, match="max_attempts"):
        welcome.options(max_attempts=0)
    with pytest.raises(ValueError, match="queue"):
        welcome.options(queue="")


@pytest.mark.anyio
async def test_defer_async_stores_the_job(db: Database) -> None:
    @job(name="test_job.welcome")
    async def welcome(user_id: int) -> None: ...

    handle = await welcome.defer_async(user_id=5)

    row = get_row(db, handle.id)
    assert (row.name, row.args) == ("test_job.welcome", {"user_id": 5})


@pytest.mark.anyio
async def test_defer_at_async_stores_run_at_equal_to_the_given_time(db: Database) -> None:
    @job
    async def ping() -> None: ...

    when = dt.datetime(2031, 1, 2, 3, 4, 5, 6, tzinfo=UTC)

    handle = await ping.defer_at_async(when)

    assert get_row(db, handle.id).run_at == when


@pytest.mark.anyio
async def test_defer_in_async_stores_run_at_now_plus_the_delay(db: Database) -> None:
    @job
    async def ping() -> None: ...

    delay = dt.timedelta(minutes=5)
    before = dt.datetime.now(UTC)
    handle = await ping.defer_in_async(delay)
    after = dt.datetime.now(UTC)

    assert before + delay - SLACK <= get_row(db, handle.id).run_at <= after + delay + SLACK


def test_defer_many_returns_handles_in_the_order_given(db: Database) -> None:
    @job(name="test_job.square")
    def square(n: int) -> None: ...

    numbers = [5, 3, 9, 1, 7, 0, 8]

    handles = square.defer_many([{"n": n} for n in numbers])

    assert [get_row(db, h.id).args for h in handles] == [{"n": n} for n in numbers]
    assert {h.name for h in handles} == {"test_job.square"}
    assert count_jobs(db) == len(numbers)


def test_defer_many_inserts_every_job_in_one_statement(db: Database) -> None:
    @job
    def square(n: int) -> None: ...

    with count_inserts(db) as inserts:
        square.defer_many([{"n": n} for n in range(50)])

    assert len(inserts) == 1
    assert count_jobs(db) == 50


def test_defer_many_with_one_bad_mapping_inserts_nothing(db: Database) -> None:
    @job
    def square(n: int) -> None: ...

    with pytest.raises(TypeError, match="missing a required argument: 'n'"):
        square.defer_many([{"n": 1}, {"m": 2}, {"n": 3}])
    assert count_jobs(db) == 0


@pytest.mark.anyio
async def test_defer_many_async_returns_handles_in_the_order_given(db: Database) -> None:
    @job
    async def square(n: int) -> None: ...

    handles = await square.defer_many_async([{"n": 2}, {"n": 1}])

    assert [get_row(db, h.id).args for h in handles] == [{"n": 2}, {"n": 1}]


# --------------------------------------------------------- argument checking


def test_defer_with_an_unknown_argument_raises_type_error_and_inserts_nothing(
    db: Database,
) -> None:
    @job(name="test_job.welcome")
    def welcome(user_id: int) -> None: ...

    untyped: Any = welcome
    with pytest.raises(TypeError, match=r"test_job\.welcome.*user_idd"):
        untyped.defer(user_id=1, user_idd=2)
    assert count_jobs(db) == 0


def test_defer_with_a_missing_argument_raises_type_error_and_inserts_nothing(
    db: Database,
) -> None:
    @job(name="test_job.welcome")
    def welcome(user_id: int) -> None: ...

    untyped: Any = welcome
    with pytest.raises(TypeError, match=r"test_job\.welcome.*user_id"):
        untyped.defer()
    assert count_jobs(db) == 0


def test_defer_with_too_many_positional_arguments_raises_type_error_and_inserts_nothing(
    db: Database,
) -> None:
    @job
    def welcome(user_id: int) -> None: ...

    untyped: Any = welcome
    with pytest.raises(TypeError):
        untyped.defer(1, 2)
    assert count_jobs(db) == 0


def test_defer_at_and_defer_in_check_arguments_too(db: Database) -> None:
    @job
    def welcome(user_id: int) -> None: ...

    untyped: Any = welcome
    with pytest.raises(TypeError):
        untyped.defer_at(dt.datetime(2031, 1, 1, tzinfo=UTC), nobody=1)
    with pytest.raises(TypeError):
        untyped.defer_in(5, nobody=1)
    assert count_jobs(db) == 0


# --------------------------------------------------------- transactional enqueue


def test_enqueue_on_a_connection_that_rolls_back_leaves_no_row(db: Database) -> None:
    @job
    def welcome(user_id: int) -> None: ...

    with db.engine.connect() as conn:
        transaction = conn.begin()
        welcome.options(connection=conn).defer(user_id=5)
        assert conn.execute(COUNT_JOBS, execution_options=db.execution_options).scalar() == 1
        transaction.rollback()

    assert count_jobs(db) == 0


def test_enqueue_on_a_connection_that_commits_leaves_one_row(db: Database) -> None:
    @job
    def welcome(user_id: int) -> None: ...

    with db.engine.connect() as conn, conn.begin():
        handle = welcome.options(connection=conn).defer(user_id=5)
        assert count_jobs(db) == 0, "the job is visible before the caller's commit"

    assert count_jobs(db) == 1
    assert get_row(db, handle.id).args == {"user_id": 5}


def test_enqueue_in_a_session_that_rolls_back_leaves_no_row(db: Database) -> None:
    @job
    def welcome(user_id: int) -> None: ...

    with Session(db.engine) as session:
        session.begin()
        welcome.options(connection=session).defer(user_id=5)
        assert session.execute(COUNT_JOBS, execution_options=db.execution_options).scalar() == 1
        session.rollback()

    assert count_jobs(db) == 0


def test_enqueue_in_a_session_that_commits_leaves_one_row(db: Database) -> None:
    @job
    def welcome(user_id: int) -> None: ...

    with Session(db.engine) as session, session.begin():
        handle = welcome.options(connection=session).defer(user_id=5)
        assert count_jobs(db) == 0, "the job is visible before the caller's commit"

    assert count_jobs(db) == 1
    assert get_row(db, handle.id).args == {"user_id": 5}


def test_sync_defer_on_an_async_connection_is_refused() -> None:
    @job
    def welcome(user_id: int) -> None: ...

    engine = create_async_engine("sqlite+aiosqlite://")
    try:
        with pytest.raises(TypeError, match="_async"):
            welcome.options(connection=AsyncSession(engine)).defer(user_id=5)
    finally:
        engine.sync_engine.dispose()


@pytest.mark.anyio
async def test_defer_async_on_an_async_connection_that_rolls_back_leaves_no_row(
    db: Database, backend: Backend
) -> None:
    @job
    def welcome(user_id: int) -> None: ...

    async with user_async_engine(backend) as engine, engine.connect() as conn:
        transaction = await conn.begin()
        await welcome.options(connection=conn).defer_async(user_id=5)
        assert await conn.scalar(COUNT_JOBS, execution_options=db.execution_options) == 1
        await transaction.rollback()

    assert count_jobs(db) == 0


@pytest.mark.anyio
async def test_defer_async_on_an_async_connection_that_commits_leaves_one_row(
    db: Database, backend: Backend
) -> None:
    @job
    def welcome(user_id: int) -> None: ...

    async with user_async_engine(backend) as engine, engine.connect() as conn, conn.begin():
        handle = await welcome.options(connection=conn).defer_async(user_id=5)
        assert count_jobs(db) == 0, "the job is visible before the caller's commit"

    assert count_jobs(db) == 1
    assert get_row(db, handle.id).args == {"user_id": 5}


@pytest.mark.anyio
async def test_defer_async_in_an_async_session_that_rolls_back_leaves_no_row(
    db: Database, backend: Backend
) -> None:
    @job
    def welcome(user_id: int) -> None: ...

    async with user_async_engine(backend) as engine, AsyncSession(engine) as session:
        await session.begin()
        await welcome.options(connection=session).defer_async(user_id=5)
        assert await session.scalar(COUNT_JOBS, execution_options=db.execution_options) == 1
        await session.rollback()

    assert count_jobs(db) == 0


@pytest.mark.anyio
async def test_defer_async_in_an_async_session_that_commits_leaves_one_row(
    db: Database, backend: Backend
) -> None:
    @job
    def welcome(user_id: int) -> None: ...

    async with (
        user_async_engine(backend) as engine,
        AsyncSession(engine) as session,
        session.begin(),
    ):
        handles = await welcome.options(connection=session).defer_many_async(
            [{"user_id": 5}, {"user_id": 6}]
        )
        assert count_jobs(db) == 0, "the jobs are visible before the caller's commit"

    assert count_jobs(db) == 2
    assert [get_row(db, h.id).args for h in handles] == [{"user_id": 5}, {"user_id": 6}]
