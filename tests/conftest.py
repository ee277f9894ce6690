"""Fixtures: every storage behaviour runs on a fresh SQLite file and a fresh Postgres schema.

PostgreSQL is found at $TASKLET_TEST_POSTGRES_URL (default: the local server's
``test`` database). When it cannot be reached the Postgres half of the suite is
skipped, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import tasklet
from tasklet import _config, _registry, hooks
from tasklet._database import Database
from tests.support import Backend, Log, finish

POSTGRES_URL = os.environ.get(
    "TASKLET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
_postgres_error: str | None = None
_postgres_checked = False


def postgres_unavailable() -> str | None:
    """Why Postgres cannot be used, or None when it can (checked once per session)."""
    global _postgres_checked, _postgres_error
    if not _postgres_checked:
        _postgres_checked = True
        engine = sa.create_engine(POSTGRES_URL)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception as exc:
            _postgres_error = f"PostgreSQL at {POSTGRES_URL} is unreachable: {exc}"
        finally:
            engine.dispose()
    return _postgres_error


def require_postgres() -> None:
    reason = postgres_unavailable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: Postgres tests must run)")
    pytest.skip(reason)


@pytest.fixture
def fresh_schema() -> Iterator[str]:
    """A new, empty Postgres schema, dropped after the test."""
    require_postgres()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(POSTGRES_URL)
    try:
        yield schema
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def empty_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """tasklet configured on an empty database (no tables yet), SQLite or Postgres."""
    if request.param == "sqlite":
        backend = Backend("sqlite", f"sqlite:///{tmp_path / 'tasklet.db'}", None)
        backend.configure()
        yield backend
    else:
        schema = request.getfixturevalue("fresh_schema")
        backend = Backend("postgres", POSTGRES_URL, schema)
        backend.configure()
        yield backend
    tasklet.configure()


def _check_state_invariants(backend: Backend) -> None:
    breaches = backend.state_invariant_breaches()
    assert not breaches, f"jobs left breaking a state invariant (id, status, locked_by): {breaches}"


@pytest.fixture
def backend(empty_backend: Backend) -> Iterator[Backend]:
    """tasklet configured on a freshly migrated database, SQLite or Postgres.

    After the test, no job it left may break a state invariant.
    """
    tasklet.upgrade()
    yield empty_backend
    _check_state_invariants(empty_backend)


@pytest.fixture
def db(backend: Backend) -> Database:
    return _config.database()


@pytest.fixture
def sqlite_only(tmp_path: Path) -> Iterator[Backend]:
    """One migrated SQLite database: for behaviours no database changes, or SQLite's own."""
    backend = Backend("sqlite", f"sqlite:///{tmp_path / 'tasklet.db'}", None)
    backend.configure()
    tasklet.upgrade()
    yield backend
    tasklet.configure()


@pytest.fixture
def pg_backend(fresh_schema: str) -> Iterator[Backend]:
    """A migrated Postgres schema only: for behaviours SQLite does not have (LISTEN/NOTIFY)."""
    backend = Backend("postgres", POSTGRES_URL, fresh_schema)
    backend.configure()
    tasklet.upgrade()
    yield backend
    _check_state_invariants(backend)
    tasklet.configure()


@pytest.fixture
def pg_db(pg_backend: Backend) -> Database:
    return _config.database()


@pytest.fixture(autouse=True)
def _forget_test_jobs() -> Iterator[None]:
    """Jobs a test defines are unregistered after it, so names can be reused."""
    before = set(_registry.names())
    yield
    for name in set(_registry.names()) - before:
        _registry.unregister(name)


@pytest.fixture(autouse=True)
def _restore_global_hooks() -> Iterator[None]:
    """Global hooks a test registers are removed after it."""
    saved = {k: list(v) for k, v in vars(hooks.GLOBAL).items()}
    yield
    for key, value in saved.items():
        setattr(hooks.GLOBAL, key, value)


@pytest.fixture
def log(tmp_path: Path) -> Log:
    """The append-only record of runs that tests/worker_jobs.py writes."""
    return Log(tmp_path / "runs.log")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        finish(process)  # reaps it and closes its output file
