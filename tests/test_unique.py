"""Unique jobs: while a job with a key is queued or running, deferring returns it."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from tasklet import JobDefinitionError, Retry, SerializationError, job, storage
from tasklet._database import Database
from tasklet.schema import jobs
from tasklet.worker import Worker
from tests.support import FAST, REPO, Backend, count_jobs, get_row, wait_for
from tests.test_job import count_inserts, user_async_engine


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def welcome() -> Any:
    @job(name="u.welcome", unique=("user_id",))
    def welcome(user_id: int, lang: str = "en") -> None: ...

    return welcome


def claim(db: Database, name: str) -> list[storage.ClaimedJob]:
    storage.worker_register(db, worker_id="w", host="h", pid=1, queues=(), concurrency=1)
    return storage.jobs_claim(db, worker_id="w", queues=None, names=[name], limit=10)


# ------------------------------------------------------------------- the key


def test_an_explicit_key_held_by_a_queued_job_returns_that_job(db: Database) -> None:
    @job(name="u.plain")
    def plain(user_id: int) -> None: ...

    first = plain.options(unique_key="welcome:5").defer(user_id=5)
    second = plain.options(unique_key="welcome:5").defer(user_id=6)

    assert (second.id, first.created, second.created) == (first.id, True, False)
    assert count_jobs(db) == 1
    assert get_row(db, first.id).args == {"user_id": 5}


def test_unique_arguments_make_the_key_and_other_arguments_do_not_count(
    db: Database, welcome: Any
) -> None:
    first = welcome.defer(user_id=5)
    same_user = welcome.defer(5, lang="fr")
    other_user = welcome.defer(user_id=6)

    assert (same_user.id, same_user.created) == (first.id, False)
    assert other_user.created and other_user.id != first.id
    assert get_row(db, first.id).unique_key == 'u.welcome:{"user_id":5}'


def test_the_key_of_unique_true_fills_in_default_arguments(db: Database) -> None:
    @job(name="u.report", unique=True)
    def report(account: int, period: str = "month") -> None: ...

    first = report.defer(account=1)
    spelled_out = report.defer(account=1, period="month")
    other = report.defer(account=1, period="week")

    assert (spelled_out.id, spelled_out.created) == (first.id, False)
    assert other.created
    assert get_row(db, first.id).unique_key == 'u.report:{"account":1,"period":"month"}'


def test_an_explicit_key_replaces_the_one_made_from_arguments(db: Database, welcome: Any) -> None:
    first = welcome.options(unique_key="k").defer(user_id=5)

    assert welcome.defer(user_id=5).created
    assert welcome.options(unique_key="k").defer(user_id=6).id == first.id


def test_an_explicit_key_is_shared_by_every_job_type_and_names_the_holder(db: Database) -> None:
    @job(name="u.a")
    def a() -> None: ...

    @job(name="u.b")
    def b() -> None: ...

    held = a.options(unique_key="nightly").defer()
    other = b.options(unique_key="nightly").defer()

    assert (other.id, other.name, other.created) == (held.id, "u.a", False)


def test_a_long_key_made_from_arguments_is_hashed(db: Database) -> None:
    @job(name="u.long", unique=True)
    def long(text: str) -> None: ...

    handle = long.defer(text="x" * 1000)

    key = get_row(db, handle.id).unique_key
    assert key is not None and key.startswith("u.long:sha256:") and len(key) < 100
    assert long.defer(text="x" * 1000).id == handle.id
    assert long.defer(text="x" * 999).created


def test_the_key_of_a_set_argument_is_the_same_in_every_process() -> None:
    @job(name="u.tags", unique=True)
    def tags(names: frozenset[str]) -> None: ...

    values = frozenset(f"tag{i}" for i in range(20))
    code = (
        "from tasklet import job\n"
        "@job(name='u.tags', unique=True)\n"
        "def tags(names): ...\n"
        f"print(tags.unique_key_for({{'names': frozenset({sorted(values)!r})}}))\n"
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={"PYTHONHASHSEED": str(seed), "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in (1, 2, 3)
    }

    assert keys == {tags.unique_key_for({"names": values})}


def test_unique_naming_an_unknown_argument_is_refused() -> None:
    with pytest.raises(JobDefinitionError, match="user"):

        @job(name="u.bad", unique=("user",))
        def bad(user_id: int) -> None: ...


def test_unique_may_name_a_single_argument_as_a_string(db: Database) -> None:
    @job(name="u.single", unique="user_id")
    def single(user_id: int, n: int) -> None: ...

    assert single.defer(user_id=1, n=1).id == single.defer(user_id=1, n=2).id


@pytest.mark.parametrize("key", ["", "a\x00b", "k" * 1001, 5])
def test_options_refuses_an_invalid_unique_key(key: Any) -> None:
    @job(name="u.plain")
    def plain() -> None: ...

    with pytest.raises(ValueError, match="unique_key"):
        plain.options(unique_key=key)


def test_an_argument_json_cannot_carry_cannot_make_a_key_and_says_what_to_do(
    db: Database,
) -> None:
    class Opaque: ...

    @job(name="u.pickled", serializer="pickle", unique=True)
    def pickled(thing: Opaque) -> None: ...

    with pytest.raises(SerializationError, match="unique_key"):
        pickled.defer(thing=Opaque())
    assert pickled.options(unique_key="thing").defer(thing=Opaque()).created
    assert count_jobs(db) == 1


def test_jobs_without_a_key_keep_the_plain_insert(db: Database) -> None:
    @job(name="u.plain")
    def plain() -> None: ...

    with count_inserts(db) as statements:
        plain.defer()
        plain.defer_many([{}, {}])

    assert len(statements) == 2
    assert not any("ON CONFLICT" in s for s in statements)


# ---------------------------------------------------------------- the window


def test_a_running_job_holds_its_key(db: Database, welcome: Any) -> None:
    first = welcome.defer(user_id=5)
    assert [r.id for r in claim(db, "u.welcome")] == [first.id]

    again = welcome.defer(user_id=5)

    assert (again.id, again.created) == (first.id, False)


def test_a_job_waiting_for_its_next_attempt_holds_its_key(db: Database) -> None:
    @job(name="u.flaky", unique=True)
    def flaky(n: int) -> None:
        raise Retry(delay=3600)

    first = flaky.defer(n=1)
    Worker(FAST).run_sync(drain=True)
    assert get_row(db, first.id).status == "queued"

    assert flaky.defer(n=1).id == first.id


def test_a_scheduled_job_holds_its_key_and_keeps_its_time(db: Database, welcome: Any) -> None:
    first = welcome.defer_in(3600, user_id=5)
    run_at = get_row(db, first.id).run_at

    now = welcome.defer(user_id=5)
    later = welcome.defer_at(dt.datetime.now(dt.UTC) + dt.timedelta(days=1), user_id=5)

    assert (now.id, later.id) == (first.id, first.id)
    assert get_row(db, first.id).run_at == run_at


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_a_finished_job_does_not_hold_its_key(db: Database, welcome: Any, status: str) -> None:
    first = welcome.defer(user_id=5)
    (row,) = claim(db, "u.welcome")
    now = storage.utcnow()
    completion = storage.Completion(
        job_id=row.id,
        lease=row.lease,
        attempt=1,
        worker_id="w",
        status=status,
        outcome="cancelled" if status == "cancelled" else status,
        started_at=now,
        finished_at=now,
    )
    assert storage.jobs_finish(db, [completion]) == {first.id}

    again = welcome.defer(user_id=5)

    assert again.created and again.id != first.id


# ------------------------------------------------------------- every method


@pytest.mark.anyio
async def test_defer_async_returns_the_holder_of_the_key(db: Database, welcome: Any) -> None:
    first = await welcome.defer_async(user_id=5)
    again = await welcome.defer_in_async(60, user_id=5)
    later = await welcome.defer_at_async(dt.datetime.now(dt.UTC), user_id=5)

    assert first.created and not again.created and not later.created
    assert {again.id, later.id} == {first.id}
    assert count_jobs(db) == 1


def test_defer_many_adds_a_job_per_free_key_and_returns_the_holders_of_the_others(
    db: Database, welcome: Any
) -> None:
    held = welcome.defer(user_id=2)

    handles = welcome.defer_many([{"user_id": 1}, {"user_id": 2}, {"user_id": 1}, {"user_id": 3}])

    assert [h.created for h in handles] == [True, False, False, True]
    assert handles[1].id == held.id and handles[2].id == handles[0].id
    assert count_jobs(db) == 3
    assert [get_row(db, h.id).args for h in handles] == [{"user_id": n} for n in (1, 2, 1, 3)]


def test_defer_many_with_one_explicit_key_adds_at_most_one_job(db: Database) -> None:
    @job(name="u.plain")
    def plain(n: int) -> None: ...

    handles = plain.options(unique_key="one").defer_many([{"n": 1}, {"n": 2}])

    assert [h.created for h in handles] == [True, False]
    assert handles[0].id == handles[1].id
    assert get_row(db, handles[0].id).args == {"n": 1}


@pytest.mark.anyio
async def test_defer_many_async_returns_the_holders_in_the_order_given(
    db: Database, welcome: Any
) -> None:
    held = welcome.defer(user_id=2)

    handles = await welcome.defer_many_async([{"user_id": 1}, {"user_id": 2}])

    assert [(h.id == held.id, h.created) for h in handles] == [(False, True), (True, False)]


def test_a_key_added_in_the_callers_transaction_is_held_within_it(
    db: Database, welcome: Any
) -> None:
    with Session(db.engine) as session, session.begin():
        first = welcome.options(connection=session).defer(user_id=5)
        again = welcome.options(connection=session).defer(user_id=5)

    assert (again.id, again.created) == (first.id, False)
    assert count_jobs(db) == 1


def test_a_rolled_back_transaction_leaves_the_key_free(db: Database, welcome: Any) -> None:
    with db.engine.connect() as conn:
        transaction = conn.begin()
        welcome.options(connection=conn).defer(user_id=5)
        transaction.rollback()

    assert welcome.defer(user_id=5).created
    assert count_jobs(db) == 1


@pytest.mark.anyio
async def test_defer_async_on_an_async_connection_returns_the_holder(
    db: Database, backend: Backend, welcome: Any
) -> None:
    held = welcome.defer(user_id=5)

    async with user_async_engine(backend) as engine, engine.connect() as conn, conn.begin():
        again = await welcome.options(connection=conn).defer_async(user_id=5)
        fresh = await welcome.options(connection=conn).defer_async(user_id=6)

    assert (again.id, again.created, fresh.created) == (held.id, False, True)
    assert count_jobs(db) == 2


# -------------------------------------------------------------- concurrency


@pytest.fixture
def uncommitted(pg_db: Database, welcome: Any) -> Iterator[tuple[sa.Connection, int]]:
    """A transaction that has deferred user 5's welcome and not committed yet."""
    with pg_db.engine.connect() as conn:
        transaction = conn.begin()
        handle = welcome.options(connection=conn).defer(user_id=5)
        yield conn, handle.id
        if transaction.is_active:
            transaction.rollback()


def _defer_in_thread(welcome: Any) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(welcome.defer(user_id=5)))
    thread.start()
    return thread, result


def _waiting_on_a_lock(db: Database) -> bool:
    query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    with db.engine.connect() as conn:
        return bool(conn.exec_driver_sql(query).scalar())


def test_on_postgres_a_key_held_by_an_uncommitted_transaction_waits_then_returns_its_job(
    pg_db: Database, welcome: Any, uncommitted: tuple[sa.Connection, int]
) -> None:
    conn, held = uncommitted
    thread, result = _defer_in_thread(welcome)
    wait_for(lambda: _waiting_on_a_lock(pg_db), timeout=10)
    assert result == []

    conn.commit()
    thread.join(10)

    assert [(h.id, h.created) for h in result] == [(held, False)]


def test_on_postgres_a_key_freed_by_a_rollback_is_taken_by_the_waiting_defer(
    pg_db: Database, welcome: Any, uncommitted: tuple[sa.Connection, int]
) -> None:
    conn, held = uncommitted
    thread, result = _defer_in_thread(welcome)
    wait_for(lambda: _waiting_on_a_lock(pg_db), timeout=10)

    conn.rollback()
    thread.join(10)

    assert len(result) == 1 and result[0].created and result[0].id != held
    assert count_jobs(pg_db) == 1


def test_on_postgres_a_unique_defer_notifies_workers_only_when_it_adds_a_job(
    pg_db: Database, welcome: Any
) -> None:
    with psycopg.connect(pg_db.conninfo, autocommit=True) as listener:
        listener.execute(f"LISTEN {pg_db.notify_channel}")
        welcome.defer(user_id=5)
        welcome.defer(user_id=5)
        welcome.defer(user_id=6)
        heard = [n.payload for n in listener.notifies(timeout=0.5)]

    # One NOTIFY per statement that added a job; the duplicate sent none.
    assert heard == ["default", "default"]


PRODUCER = """
import os, sys, time
from tasklet import job
@job(name="u.race", unique=True)
def race(n: int) -> None: ...
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.001)
for _ in range(3):
    for n in range(40):
        handle = race.defer(n=n)
        print(n, handle.id, int(handle.created))
"""


@pytest.mark.slow
def test_producers_in_several_processes_racing_on_the_same_keys_add_one_job_per_key(
    backend: Backend, db: Database, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    producers = [
        subprocess.Popen(
            [sys.executable, "-c", PRODUCER, str(go)],
            cwd=REPO,
            env=backend.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    go.touch()
    outputs = [p.communicate(timeout=120) for p in producers]

    assert [p.returncode for p in producers] == [0, 0, 0, 0], [err for _, err in outputs]
    ids: dict[int, set[int]] = defaultdict(set)
    created: dict[int, int] = defaultdict(int)
    for out, _ in outputs:
        for line in out.splitlines():
            n, job_id, was_created = map(int, line.split())
            ids[n].add(job_id)
            created[n] += was_created
    assert sorted(ids) == list(range(40))
    assert all(len(found) == 1 for found in ids.values())
    assert set(created.values()) == {1}
    with db.begin(read_only=True) as conn:
        keys = conn.execute(
            sa.select(jobs.c.unique_key), execution_options=db.execution_options
        ).scalars()
        assert sorted(keys) == sorted(f'u.race:{{"n":{n}}}' for n in range(40))
