"""tasklet's pytest plugin: a fresh migrated database per test, and the testing helpers.

Installed with tasklet (entry point ``pytest11``); nothing happens unless a
test asks for a fixture:

* ``tasklet_database``: tasklet configured on a new, migrated database for this
  test: a SQLite file in ``tmp_path``, or, when ``$TASKLET_DATABASE_URL`` is a
  PostgreSQL URL, a new schema in that database (dropped afterwards). Yields a
  :class:`TaskletDatabase` (its ``url``, ``schema`` and ``env`` for subprocesses).
* ``tasklet_drain``: :func:`tasklet.testing.drain`, on that database.
* ``tasklet_eager``: the test runs inside :func:`tasklet.testing.eager`; the
  fixture is the list of attempts run.

The previous configuration is restored after each test.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from . import _config, migrations, testing
from ._config import URL_ENV
from ._database import normalize_url


@dataclass(frozen=True)
class TaskletDatabase:
    """The database a test's tasklet uses: how to reach it from this process or another."""

    url: str
    schema: str | None

    @property
    def env(self) -> dict[str, str]:
        """``os.environ`` for a subprocess (a worker, your CLI) that must use this database."""
        env = {**os.environ, URL_ENV: self.url}
        env.pop(_config.SCHEMA_ENV, None)
        if self.schema is not None:
            env[_config.SCHEMA_ENV] = self.schema
        return env

    def create_engine(self, **options: Any) -> sa.Engine:
        """An engine on this database for your application's own tables in the test.

        On PostgreSQL its connections use the test's schema (``search_path``),
        so your tables sit beside tasklet's and are dropped with them.
        """
        if self.schema is not None:
            connect_args = options.setdefault("connect_args", {})
            connect_args.setdefault("options", f"-csearch_path={self.schema}")
        return sa.create_engine(normalize_url(self.url), **options)


def _restore(settings: _config.Settings) -> None:
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    _config.configure(**fields)


@pytest.fixture
def tasklet_database(tmp_path: Path) -> Iterator[TaskletDatabase]:
    """tasklet configured on a fresh, migrated database for this test (see the module doc)."""
    saved = _config.settings()
    url = os.environ.get(URL_ENV, "")
    if url.startswith("postgres"):
        database = TaskletDatabase(url, f"tasklet_test_{uuid.uuid4().hex[:12]}")
    else:
        database = TaskletDatabase(f"sqlite:///{tmp_path / 'tasklet.db'}", None)
    _config.configure(database.url, schema=database.schema)
    own = _config.database()  # the test may configure tasklet otherwise in the meantime
    try:
        migrations.upgrade()
        yield database
    finally:
        if database.schema is not None:
            with own.begin() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{database.schema}" CASCADE')
        own.dispose()
        _restore(saved)


@pytest.fixture
def tasklet_drain(tasklet_database: TaskletDatabase) -> Callable[..., list[testing.Ran]]:
    """:func:`tasklet.testing.drain`: run every due job now; returns what ran."""
    return testing.drain


@pytest.fixture
def tasklet_eager(tasklet_database: TaskletDatabase) -> Iterator[list[testing.Ran]]:
    """Run the test inside :func:`tasklet.testing.eager`: every ``.defer()`` runs at once."""
    with testing.eager() as ran:
        yield ran
