"""Configuration, clear errors about the database, and SQLite set up for concurrent writers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import os
import sqlite3
import subprocess
import sys
import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import tasklet
from tasklet import (
    DatabaseUnavailableError,
    SchemaMissingError,
    _config,
    job,
    storage,
)
from tasklet._database import Database
from tasklet.schema import jobs
from tests import jobs_for_tests
from tests.support import Backend

REPO = Path(__file__).resolve().parent.parent

sqlite_only = pytest.mark.parametrize("empty_backend", ["sqlite"], indirect=True)


@pytest.fixture(autouse=True)
def _default_configuration_afterwards() -> Iterator[None]:
    """Tests here reconfigure tasklet: put the default back (and dispose what they made)."""
    yield
    tasklet.configure()


def count_jobs(db: Database) -> int:
    with db.begin(read_only=True) as conn:
        return conn.execute(
            sa.select(sa.func.count()).select_from(jobs), execution_options=db.execution_options
        ).scalar_one()


def pragma(db: Database, name: str) -> Any:
    """A PRAGMA's value as seen on a connection of tasklet's own engine."""
    with db.engine.connect() as conn:
        return conn.exec_driver_sql(f"PRAGMA {name}").scalar()


# -------------------------------------------------------------- configuration


def test_database_url_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'from-env.db'}"
    monkeypatch.setenv("TASKLET_DATABASE_URL", url)

    tasklet.configure()

    assert _config.database().engine.url.render_as_string() == url


def test_database_url_passed_to_configure_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TASKLET_DATABASE_URL", f"sqlite:///{tmp_path / 'from-env.db'}")
    url = f"sqlite:///{tmp_path / 'explicit.db'}"

    tasklet.configure(url)

    assert _config.database().engine.url.render_as_string() == url


def test_default_database_is_tasklet_db_in_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TASKLET_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)

    tasklet.configure()

    assert _config.database().engine.url.render_as_string() == "sqlite:///tasklet.db"


def test_configure_with_an_engine_defers_through_that_engine(backend: Backend) -> None:
    engine = sa.create_engine(backend.url)
    try:
        tasklet.configure(engine=engine, schema=backend.schema)
        db = _config.database()

        @job
        def ping() -> None: ...

        ping.defer()

        assert db.engine is engine
        with engine.connect() as conn:
            count = sa.select(sa.func.count()).select_from(jobs)
            assert conn.execute(count, execution_options=db.execution_options).scalar() == 1
    finally:
        tasklet.configure()
        engine.dispose()


def test_configuring_the_same_sqlite_engine_twice_keeps_deferring_working(
    tmp_path: Path,
) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'shared.db'}")
    try:
        tasklet.configure(engine=engine)
        tasklet.upgrade()

        @job
        def ping() -> None: ...

        ping.defer()
        tasklet.configure(engine=engine)
        ping.defer()

        assert count_jobs(_config.database()) == 2
    finally:
        tasklet.configure()
        engine.dispose()


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_plain_postgresql_url_gets_the_psycopg_driver(scheme: str) -> None:
    tasklet.configure(f"{scheme}://app@db.example.com:5432/app")

    url = _config.database().engine.url

    assert url.drivername == "postgresql+psycopg"
    assert (url.host, url.database) == ("db.example.com", "app")


def test_url_and_engine_together_are_a_value_error(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with pytest.raises(ValueError, match="url or an engine"):
            tasklet.configure(f"sqlite:///{tmp_path / 'y.db'}", engine=engine)
    finally:
        engine.dispose()


# ------------------------------------------------------------------ errors


def test_deferring_before_migrating_raises_schema_missing_error_saying_tasklet_migrate(
    empty_backend: Backend,
) -> None:
    @job
    def ping() -> None: ...

    with pytest.raises(SchemaMissingError, match="tasklet migrate"):
        ping.defer()


def test_unreachable_database_raises_database_unavailable_error_hiding_the_password() -> None:
    tasklet.configure("postgresql://user:secret@127.0.0.1:1/x")

    @job
    def ping() -> None: ...

    with pytest.raises(DatabaseUnavailableError) as caught:
        ping.defer()

    message = str(caught.value)
    assert "postgresql+psycopg://user:***@127.0.0.1:1/x" in message
    assert "secret" not in message
    assert "secret" not in str(caught.value.__cause__)


def test_unopenable_sqlite_file_raises_database_unavailable_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'no-such-folder' / 'tasklet.db'}"
    tasklet.configure(url)

    @job
    def ping() -> None: ...

    with pytest.raises(DatabaseUnavailableError, match="no-such-folder"):
        ping.defer()


# ------------------------------------------------------------------ SQLite


@sqlite_only
def test_sqlite_journal_mode_is_wal(db: Database) -> None:
    assert pragma(db, "journal_mode") == "wal"


@sqlite_only
def test_sqlite_busy_timeout_is_set(db: Database) -> None:
    assert pragma(db, "busy_timeout") == 30_000


@sqlite_only
def test_sqlite_busy_timeout_follows_the_setting(backend: Backend) -> None:
    tasklet.configure(backend.url, sqlite_busy_timeout_s=2.5)

    assert pragma(_config.database(), "busy_timeout") == 2_500


@sqlite_only
def test_sqlite_foreign_keys_are_enforced(db: Database) -> None:
    assert pragma(db, "foreign_keys") == 1


@sqlite_only
def test_sqlite_commits_are_fully_synced_by_default(db: Database) -> None:
    assert pragma(db, "synchronous") == 2  # FULL


# Enqueues that commit at once run on a connection each thread keeps (Database.autocommit).


@sqlite_only
def test_sqlite_enqueue_connection_has_the_same_settings(db: Database) -> None:
    with db.autocommit() as conn:
        settings = [
            conn.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
        ]

    assert settings == ["wal", 2, 30_000, 1]


@sqlite_only
def test_sqlite_thread_keeps_one_connection_for_its_enqueues(db: Database) -> None:
    connects: list[object] = []
    sa.event.listen(db.autocommit_engine, "connect", lambda dbapi, record: connects.append(dbapi))

    for n in range(20):
        jobs_for_tests.noop.defer(n=n)

    assert len(connects) == 1 and count_jobs(db) == 20


@sqlite_only
def test_sqlite_nested_autocommit_gets_a_connection_of_its_own(db: Database) -> None:
    with db.autocommit() as outer, db.autocommit() as inner:
        assert inner is not outer
        assert inner.connection.dbapi_connection is not outer.connection.dbapi_connection


@sqlite_only
def test_sqlite_enqueue_connection_leaves_no_transaction_open(
    backend: Backend, db: Database
) -> None:
    path = str(sa.make_url(backend.url).database)

    with db.autocommit() as conn:
        conn.execute(sa.select(sa.func.count()).select_from(jobs))  # begins a transaction

    assert another_writer_can_lock(path)


@sqlite_only
def test_sqlite_many_threads_enqueue_beyond_any_pool_size(db: Database) -> None:
    threads, per_thread = 40, 5
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = [
            pool.submit(
                lambda t: [jobs_for_tests.noop.defer(n=t * 100 + i) for i in range(per_thread)], t
            )
            for t in range(threads)
        ]
        handles = [h for f in futures for h in f.result(timeout=60)]

    assert len({h.id for h in handles}) == threads * per_thread == count_jobs(db)


@sqlite_only
def test_sqlite_thread_connection_closes_when_its_thread_ends(db: Database) -> None:
    held: list[sa.Connection] = []

    def enqueue() -> None:
        jobs_for_tests.noop.defer(n=1)
        with db.autocommit() as conn:
            held.append(conn)

    worker = threading.Thread(target=enqueue)
    worker.start()
    worker.join(timeout=30)
    del worker
    gc.collect()

    assert len(held) == 1 and held[0].closed


@sqlite_only
def test_reconfiguring_closes_every_thread_connection(db: Database) -> None:
    held: list[sa.Connection] = []

    def enqueue() -> None:
        jobs_for_tests.noop.defer(n=1)
        with db.autocommit() as conn:
            held.append(conn)

    worker = threading.Thread(target=enqueue)
    worker.start()
    worker.join(timeout=30)
    enqueue()
    tasklet.configure()

    assert len(held) == 2 and all(conn.closed for conn in held)


def another_writer_can_lock(path: str) -> bool:
    """Whether a second connection could take the write lock right now (without waiting)."""
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
        return False
    else:
        conn.execute("ROLLBACK")
        return True
    finally:
        conn.close()


@sqlite_only
def test_sqlite_write_transaction_holds_the_write_lock_from_its_begin(
    backend: Backend, db: Database
) -> None:
    path = str(sa.make_url(backend.url).database)

    with db.begin():
        assert not another_writer_can_lock(path)
    assert another_writer_can_lock(path)


@sqlite_only
def test_sqlite_read_only_transaction_leaves_the_write_lock_free(
    backend: Backend, db: Database
) -> None:
    path = str(sa.make_url(backend.url).database)

    with db.begin(read_only=True) as conn:
        conn.execute(sa.select(sa.func.count()).select_from(jobs))
        assert another_writer_can_lock(path)


WRITER = """
import sys

import tasklet
from tasklet import _config
from tests import jobs_for_tests

url, count = sys.argv[1], int(sys.argv[2])
tasklet.configure(url)
with _config.database().engine.connect():
    pass
print("ready", flush=True)
sys.stdin.readline()
for n in range(count):
    jobs_for_tests.noop.defer(n=n)
"""


@pytest.mark.slow
@sqlite_only
def test_concurrent_processes_defer_into_one_sqlite_file_without_lock_errors(
    backend: Backend, db: Database
) -> None:
    processes, per_process = 4, 200
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKLET_")}
    with contextlib.ExitStack() as stack:
        writers = [
            stack.enter_context(
                subprocess.Popen(
                    [sys.executable, "-c", WRITER, backend.url, str(per_process)],
                    cwd=REPO,
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            for _ in range(processes)
        ]
        # Every writer is connected and waiting: release them all at once.
        for writer in writers:
            assert writer.stdout is not None
            if writer.stdout.readline() != "ready\n":
                pytest.fail(f"a writer did not start: {writer.communicate(timeout=60)[1]}")
        for writer in writers:
            assert writer.stdin is not None
            writer.stdin.write("go\n")
            writer.stdin.flush()
        outcomes = [(w.communicate(timeout=120)[1], w.returncode) for w in writers]

    for stderr, returncode in outcomes:
        assert "database is locked" not in stderr
        assert returncode == 0, stderr
    rows = storage.jobs_list(db)
    assert len(rows) == processes * per_process
    assert {row.name for row in rows} == {"tests.noop"}
    assert Counter(row.args["n"] for row in rows if row.args) == {
        n: processes for n in range(per_process)
    }


# ------------------------------------------------------ connections tasklet keeps


def test_driver_statements_reuse_one_cursor_per_connection(db: Database) -> None:
    with db.autocommit() as conn:
        db.driver_execute(conn, "SELECT 1", {})
        cursor = conn.connection.info["tasklet_cursor"]
        assert db.driver_execute(conn, "SELECT 2", {}) == [(2,)]
        assert conn.connection.info["tasklet_cursor"] is cursor


def test_a_pooled_connection_the_pool_lets_go_is_not_kept_alive_by_its_cursor(
    pg_db: Database,
) -> None:
    with pg_db.autocommit() as conn:
        pg_db.driver_execute(conn, "SELECT 1", {})
        driver = weakref.ref(conn.connection.dbapi_connection)
    pg_db.dispose()
    gc.collect()
    assert driver() is None


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_closed_async_connection_is_not_kept_alive(pg_db: Database) -> None:
    link = await pg_db.connect_async()
    assert await pg_db.execute_on_async(link, "SELECT 1", None) == [(1,)]
    connection = weakref.ref(link.connection)
    await link.close()
    del link
    gc.collect()
    assert connection() is None


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_async_enqueues_keep_a_few_idle_connections_and_close_the_rest(
    pg_db: Database,
) -> None:
    # Eight enqueues at once need eight connections; four stay idle afterwards.
    await asyncio.gather(
        *(pg_db.driver_execute_async("SELECT pg_sleep(0.05)", {}) for _ in range(8))
    )
    gc.collect()
    assert len(pg_db._async_all) == 4
    assert all(not link.connection.closed for link in pg_db._async_all)


def test_sync_enqueues_on_postgresql_reuse_one_connection_of_their_own(pg_db: Database) -> None:
    for n in range(20):
        jobs_for_tests.noop.defer(n=n)

    assert count_jobs(pg_db) == 20
    assert len(pg_db._sync_links.idle) == 1
    pool = pg_db.autocommit_engine.pool
    assert (pool.checkedin(), pool.checkedout()) == (0, 0)  # type: ignore[attr-defined]


def test_sync_enqueues_past_their_own_connections_use_the_pool(
    pg_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tasklet._database._SYNC_OWN_MAX", 0)

    jobs_for_tests.noop.defer(n=1)

    assert count_jobs(pg_db) == 1
    assert pg_db._sync_links.idle == []
    assert pg_db.autocommit_engine.pool.checkedin() == 1  # type: ignore[attr-defined]


def test_sync_enqueues_fire_cursor_events_for_whoever_listens(pg_db: Database) -> None:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    sa.event.listen(pg_db.autocommit_engine, "before_cursor_execute", record)
    try:
        jobs_for_tests.noop.defer(n=1)
    finally:
        sa.event.remove(pg_db.autocommit_engine, "before_cursor_execute", record)

    assert len(seen) == 1
    assert "INSERT INTO" in seen[0]


def test_a_sync_enqueue_on_a_lost_server_says_so_and_the_next_one_reconnects(
    pg_db: Database,
) -> None:
    import psycopg

    jobs_for_tests.noop.defer(n=1)
    for _ in range(2):  # three idle connections in all, each lost below
        link = pg_db._sync_links.open(pg_db.conninfo)
        assert link is not None
        pg_db._sync_links.give_back(link)
    lost = [link.connection.info.backend_pid for link in pg_db._sync_links.idle]
    with psycopg.connect(pg_db.conninfo, autocommit=True) as admin:
        for pid in lost:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    with pytest.raises(DatabaseUnavailableError, match="cannot reach the database"):
        jobs_for_tests.noop.defer(n=2)
    jobs_for_tests.noop.defer(n=3)  # not on another of the lost connections

    assert count_jobs(pg_db) == 2
    [link] = pg_db._sync_links.idle
    assert link.connection.info.backend_pid not in lost


def test_dispose_closes_the_idle_sync_connections(pg_db: Database) -> None:
    jobs_for_tests.noop.defer(n=1)
    [link] = pg_db._sync_links.idle

    pg_db.dispose()

    assert link.connection.closed
    assert pg_db._sync_links.idle == []


def test_a_forked_child_enqueues_on_a_connection_of_its_own(pg_db: Database) -> None:
    jobs_for_tests.noop.defer(n=1)
    [parent_link] = pg_db._sync_links.idle
    parent_backend = parent_link.connection.info.backend_pid

    child = os.fork()
    if child == 0:  # the child: defer, then say whether it used a connection of its own
        code = 1
        try:
            jobs_for_tests.noop.defer(n=2)
            [link] = pg_db._sync_links.idle
            code = 0 if link.connection.info.backend_pid != parent_backend else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    jobs_for_tests.noop.defer(n=3)

    assert os.waitstatus_to_exitcode(status) == 0
    assert count_jobs(pg_db) == 3
    assert pg_db._sync_links.idle == [parent_link]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_an_async_enqueue_on_a_lost_server_says_so_and_the_next_one_reconnects(
    pg_db: Database,
) -> None:
    import psycopg

    await asyncio.gather(
        *(pg_db.driver_execute_async("SELECT pg_sleep(0.05)", {}) for _ in range(3))
    )
    idle = pg_db._idle_async_connections()
    lost = [link.connection.info.backend_pid for link in idle]
    assert len(lost) == 3
    with psycopg.connect(pg_db.conninfo, autocommit=True) as admin:
        for pid in lost:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    with pytest.raises(DatabaseUnavailableError, match="cannot reach the database"):
        await jobs_for_tests.noop.defer_async(n=1)
    await jobs_for_tests.noop.defer_async(n=2)  # not on another of the lost connections

    assert count_jobs(pg_db) == 1
    [link] = idle
    assert link.connection.info.backend_pid not in lost


def test_sync_enqueues_keep_a_few_idle_connections_and_close_the_rest(pg_db: Database) -> None:
    links = pg_db._sync_links
    opened = [links.open(pg_db.conninfo) for _ in range(6)]  # as six threads at once would

    for link in opened:
        assert link is not None
        links.give_back(link)

    assert len(links.idle) == 4
    assert [link.connection.closed for link in opened if link is not None].count(True) == 2
