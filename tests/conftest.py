"""Fixtures: every storage behaviour runs on a fresh SQLite file and a fresh Postgres schema.

PostgreSQL is found at $TASKLET_TEST_POSTGRES_URL (default: the local server's
``test`` database). When it cannot be reached the Postgres half of the suite is
skipped, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import tasklet
from tasklet import _config, _registry
from tasklet._database import Database

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


class Backend:
    """A migrated, empty tasklet database that the test owns, and how to reach it."""

    def __init__(self, name: str, url: str, schema: str | None) -> None:
        self.name = name
        self.url = url
        self.schema = schema

    @property
    def env(self) -> dict[str, str]:
        """Environment for a subprocess (worker, CLI) that must use this database."""
        env = {**os.environ, "TASKLET_DATABASE_URL": self.url}
        if self.schema is not None:
            env["TASKLET_SCHEMA"] = self.schema
        else:
            env.pop("TASKLET_SCHEMA", None)
        return env

    @contextlib.contextmanager
    def connect(self) -> Iterator[sa.Connection]:
        """A plain connection (not tasklet's engine) that sees only this backend's tables."""
        engine = sa.create_engine(self.url)
        try:
            with engine.connect() as conn:
                if self.schema is not None:
                    conn.exec_driver_sql(f'SET search_path TO "{self.schema}"')
                    conn.commit()
                yield conn
        finally:
            engine.dispose()

    def table_names(self) -> set[str]:
        with self.connect() as conn:
            return set(sa.inspect(conn).get_table_names())

    def configure(self) -> Database:
        tasklet.configure(self.url, schema=self.schema)
        return _config.database()

    def __repr__(self) -> str:
        return f"<Backend {self.name}>"


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


@pytest.fixture
def backend(empty_backend: Backend) -> Backend:
    """tasklet configured on a freshly migrated database, SQLite or Postgres."""
    tasklet.upgrade()
    return empty_backend


@pytest.fixture
def db(backend: Backend) -> Database:
    return _config.database()


@pytest.fixture
def pg_db(fresh_schema: str) -> Iterator[Database]:
    """A migrated Postgres schema only: for behaviours SQLite does not have (LISTEN/NOTIFY)."""
    Backend("postgres", POSTGRES_URL, fresh_schema).configure()
    tasklet.upgrade()
    yield _config.database()
    tasklet.configure()


@pytest.fixture(autouse=True)
def _forget_test_jobs() -> Iterator[None]:
    """Jobs a test defines are unregistered after it, so names can be reused."""
    before = set(_registry.names())
    yield
    for name in set(_registry.names()) - before:
        _registry.unregister(name)
