"""tasklet.testing: drain, eager and the assertions, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import tasklet
from tasklet import JobContext, job
from tasklet._database import Database
from tasklet.testing import assert_deferred, deferred_jobs, drain, eager
from tests.conftest import POSTGRES_URL, require_postgres
from tests.support import REPO, count_jobs, get_row

# ------------------------------------------------------------------- drain


def test_drain_runs_due_jobs_and_returns_their_arguments_and_results(db: Database) -> None:
    @job(name="testing.add")
    def add(a: int, b: int) -> int:
        return a + b

    handle = add.defer(a=2, b=3)

    (ran,) = drain()

    assert (ran.id, ran.name, ran.args, ran.attempt) == (
        handle.id,
        "testing.add",
        {"a": 2, "b": 3},
        1,
    )
    assert (ran.outcome, ran.result, ran.error) == ("succeeded", 5, None)
    assert get_row(db, handle.id).status == "succeeded"


def test_drain_runs_retries_at_once_and_hands_back_the_exception(db: Database) -> None:
    @job(name="testing.always_fails", max_attempts=3, backoff=3600)
    def always_fails() -> None:
        raise ValueError("no")

    handle = always_fails.defer()

    ran = drain()

    assert [(r.attempt, r.outcome, r.will_retry) for r in ran] == [
        (1, "failed", True),
        (2, "failed", True),
        (3, "failed", False),
    ]
    assert isinstance(ran[-1].error, ValueError) and str(ran[-1].error) == "no"
    assert get_row(db, handle.id).status == "failed"


def test_drain_without_retries_leaves_a_failed_job_waiting_for_its_backoff(db: Database) -> None:
    @job(name="testing.fails_once", backoff=3600)
    def fails_once() -> None:
        raise ValueError("later")

    handle = fails_once.defer()

    ran = drain(retries=False)

    assert [(r.attempt, r.outcome) for r in ran] == [(1, "failed")]
    row = get_row(db, handle.id)
    assert (row.status, row.attempts) == ("queued", 1)


def test_drain_leaves_jobs_deferred_for_later_unless_scheduled_is_set(db: Database) -> None:
    @job(name="testing.later")
    def later() -> str:
        return "ran"

    handle = later.defer_in(3600)

    assert drain() == []
    assert get_row(db, handle.id).status == "queued"
    assert [r.result for r in drain(scheduled=True)] == ["ran"]
    assert get_row(db, handle.id).status == "succeeded"


def test_drain_takes_only_the_queues_it_is_given(db: Database) -> None:
    @job(name="testing.queued_where", queue="email")
    def email() -> None: ...

    @job(name="testing.queued_elsewhere", queue="reports")
    def report() -> None: ...

    email.defer()
    kept = report.defer()

    assert [r.name for r in drain("email")] == ["testing.queued_where"]
    assert get_row(db, kept.id).status == "queued"


def test_drain_also_runs_the_jobs_that_jobs_defer(db: Database) -> None:
    @job(name="testing.child")
    def child(n: int) -> int:
        return n

    @job(name="testing.parent")
    def parent() -> None:
        child.defer_in(60, n=7)

    parent.defer()

    ran = drain(scheduled=True)

    assert [(r.name, r.result) for r in ran] == [("testing.parent", None), ("testing.child", 7)]


def test_drain_stops_a_job_that_keeps_deferring_itself_after_max_rounds(db: Database) -> None:
    @job(name="testing.forever")
    def forever() -> None:
        forever.defer_in(60)

    forever.defer()

    with pytest.raises(RuntimeError, match="ran 3 rounds"):
        drain(scheduled=True, max_rounds=3)


# ------------------------------------------------------------------- eager


def test_eager_defer_runs_the_job_at_once_with_its_hooks_and_writes_no_row(db: Database) -> None:
    seen: list[tuple[str, int | None]] = []

    @job(name="testing.eager_welcome")
    def welcome(ctx: JobContext, user_id: int) -> str:
        seen.append(("job", ctx.job_id))
        return f"hello {user_id}"

    @welcome.after_success
    def audit(ctx: JobContext, result: object) -> None:
        seen.append((str(result), ctx.job_id))

    with eager() as ran:
        handle = welcome.defer(user_id=5)

    assert handle.id < 0 and tasklet.get_job(handle.id) is None
    assert seen == [("job", handle.id), ("hello 5", handle.id)]
    assert [(r.id, r.args, r.result) for r in ran] == [(handle.id, {"user_id": 5}, "hello 5")]
    assert count_jobs(db) == 0


def test_eager_retries_at_once_then_raises_the_last_error(db: Database) -> None:
    attempts: list[int] = []

    @job(name="testing.eager_fails", max_attempts=2, backoff=3600)
    def fails(ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        raise ConnectionError(f"attempt {ctx.attempt}")

    with eager(), pytest.raises(ConnectionError, match="attempt 2"):
        fails.defer()

    assert attempts == [1, 2]


def test_eager_without_propagate_records_the_failure_instead(db: Database) -> None:
    @job(name="testing.eager_aborts")
    def aborts() -> None:
        raise tasklet.Abort("bad input")

    with eager(propagate=False) as ran:
        aborts.defer()

    assert [(r.outcome, type(r.error)) for r in ran] == [("failed", tasklet.Abort)]


def test_eager_refuses_arguments_a_worker_could_not_decode(db: Database) -> None:
    @job(name="testing.eager_bad_args")
    def takes(value: list[object]) -> None: ...

    with eager(), pytest.raises(tasklet.SerializationError):
        takes.defer(value=[object()])


def test_eager_runs_async_defers_on_the_callers_loop(db: Database) -> None:
    @job(name="testing.eager_async")
    async def double(n: int) -> int:
        await asyncio.sleep(0)
        return n * 2

    async def main() -> list[int]:
        await double.defer_async(n=2)
        await double.defer_many_async([{"n": 3}])
        double.defer(n=4)  # a sync defer inside a running loop
        return [r.result for r in ran]

    with eager() as ran:
        assert asyncio.run(main()) == [4, 6, 8]


def test_eager_job_deferred_in_a_session_runs_when_it_commits(db: Database) -> None:
    ran: list[int] = []

    @job(name="testing.eager_in_session")
    def welcome(user_id: int) -> None:
        ran.append(user_id)

    with eager(), Session(db.engine) as session:
        with session.begin():
            welcome.options(connection=session).defer(user_id=5)
            assert ran == []  # the transaction has not committed yet
        assert ran == [5]


def test_eager_job_deferred_in_a_session_that_rolls_back_never_runs(db: Database) -> None:
    ran: list[int] = []

    @job(name="testing.eager_rolled_back")
    def welcome(user_id: int) -> None:
        ran.append(user_id)

    with eager(), Session(db.engine) as session:
        with session.begin():
            welcome.options(connection=session).defer(user_id=5)
            session.rollback()
        with session.begin():
            welcome.options(connection=session).defer(user_id=6)

    assert ran == [6]


# ------------------------------------------------------------- assertions


def test_assert_deferred_matches_the_arguments_given(db: Database) -> None:
    @job(name="testing.notify")
    def notify(user_id: int, lang: str = "en") -> None: ...

    first = notify.defer(user_id=5, lang="fr")
    notify.defer(6)

    assert [d.id for d in assert_deferred(notify, user_id=5)] == [first.id]
    assert len(assert_deferred(notify)) == 2
    assert_deferred(notify, 7, count=0)


def test_assert_deferred_failure_lists_what_is_queued(db: Database) -> None:
    @job(name="testing.notify_missing")
    def notify(user_id: int) -> None: ...

    notify.defer(user_id=6)

    with pytest.raises(AssertionError, match=r"found 0\. Queued testing.notify_missing jobs:\n"):
        assert_deferred(notify, user_id=5)


def test_deferred_jobs_are_the_queued_ones_of_a_job_or_queue(db: Database) -> None:
    @job(name="testing.listed", queue="email")
    def listed(when: dt.datetime) -> None: ...

    @job(name="testing.other")
    def other() -> None: ...

    when = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    handle = listed.defer(when=when)
    other.defer()

    (found,) = deferred_jobs(listed)
    assert (found.id, found.args, found.queue, found.attempts) == (
        handle.id,
        {"when": when},
        "email",
        0,
    )
    assert [d.name for d in deferred_jobs(queue="default")] == ["testing.other"]
    drain()
    assert deferred_jobs() == []


# ------------------------------------------------------------- pytest plugin

USER_TESTS = """
import os

import tasklet
from tasklet import job
from tasklet.testing import assert_deferred


@job(name="user.send_welcome")
def send_welcome(user_id: int) -> str:
    return f"sent {user_id}"


def test_drained(tasklet_database, tasklet_drain):
    with open(os.environ["SCHEMA_FILE"], "w") as out:
        out.write(tasklet_database.schema or "")
    send_welcome.defer(user_id=5)
    assert_deferred(send_welcome, user_id=5)
    (ran,) = tasklet_drain()
    assert ran.result == "sent 5"


def test_each_test_gets_a_fresh_database(tasklet_database):
    assert tasklet.get_job(1) is None


def test_eager(tasklet_eager):
    send_welcome.defer(user_id=6)
    assert [r.result for r in tasklet_eager] == ["sent 6"]
"""


def _run_user_tests(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_user.py").write_text(USER_TESTS)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO), "SCHEMA_FILE": str(tmp_path / "schema")},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_plugin_fixtures_give_each_test_a_fresh_sqlite_database(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKLET_")}

    result = _run_user_tests(tmp_path, env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    assert (tmp_path / "schema").read_text() == ""
    assert not (tmp_path / "tasklet.db").exists()  # the files were in each test's tmp_path


@pytest.mark.slow
def test_plugin_fixtures_use_a_fresh_postgres_schema_when_the_url_says_postgres(
    tmp_path: Path,
) -> None:
    require_postgres()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKLET_")}
    env["TASKLET_DATABASE_URL"] = POSTGRES_URL

    result = _run_user_tests(tmp_path, env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    schema = (tmp_path / "schema").read_text()
    assert schema.startswith("tasklet_test_")
    engine = sa.create_engine(POSTGRES_URL)
    with engine.connect() as conn:
        left = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)
        ).scalar()
    engine.dispose()
    assert left == 0  # dropped after the test


def test_drain_works_from_inside_a_running_event_loop(db: Database) -> None:
    @job(name="testing.from_async_test")
    async def ping() -> str:
        return "pong"

    async def async_test() -> list[object]:
        await ping.defer_async()
        return [r.result for r in drain()]

    assert asyncio.run(async_test()) == ["pong"]
