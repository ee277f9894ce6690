"""Settings, and the process-wide database tasklet uses unless told otherwise."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from ._database import Database

DEFAULT_URL = "sqlite:///tasklet.db"
URL_ENV = "TASKLET_DATABASE_URL"
SCHEMA_ENV = "TASKLET_SCHEMA"

SqliteSynchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


@dataclass(frozen=True)
class Settings:
    """How tasklet reaches its database.

    ``url`` defaults to ``$TASKLET_DATABASE_URL``, then ``sqlite:///tasklet.db``.
    ``engine`` is an existing SQLAlchemy engine to share instead of a URL.
    ``schema`` puts tasklet's tables in a PostgreSQL schema other than the
    connection's default (``$TASKLET_SCHEMA``).
    """

    url: str | None = None
    engine: Engine | None = field(default=None, compare=False)
    schema: str | None = None
    #: Encoded arguments larger than this are refused at enqueue (None: no limit).
    max_payload_bytes: int | None = 1_000_000
    #: SQLite's durability: FULL syncs every commit (survives power loss); NORMAL is
    #: faster and survives a crash of the process but may lose the last commits on power loss.
    sqlite_synchronous: SqliteSynchronous = "FULL"
    #: How long a SQLite writer waits for the write lock before giving up.
    sqlite_busy_timeout_s: float = 30.0

    def resolved_url(self) -> str:
        return self.url or os.environ.get(URL_ENV) or DEFAULT_URL

    def resolved_schema(self) -> str | None:
        return self.schema if self.schema is not None else (os.environ.get(SCHEMA_ENV) or None)


_lock = threading.Lock()
_settings = Settings()
_database: Database | None = None


def configure(
    url: str | None = None,
    *,
    engine: Engine | None = None,
    schema: str | None = None,
    **options: Any,
) -> None:
    """Point tasklet at a database, by URL or with an existing SQLAlchemy engine.

    Without a call, tasklet uses ``$TASKLET_DATABASE_URL`` or
    ``sqlite:///tasklet.db``. A plain ``postgresql://`` URL uses psycopg 3.

    >>> import tasklet
    >>> tasklet.configure("postgresql://app@localhost/app", schema="jobs")  # doctest: +SKIP

    Other keyword arguments are fields of :class:`Settings`
    (``max_payload_bytes``, ``sqlite_synchronous``, ``sqlite_busy_timeout_s``).
    """
    global _settings, _database
    if url is not None and engine is not None:
        raise ValueError("configure() takes a url or an engine, not both")
    new = replace(Settings(), url=url, engine=engine, schema=schema, **options)
    with _lock:
        old, _database, _settings = _database, None, new
    if old is not None:
        old.dispose()


def settings() -> Settings:
    return _settings


def database() -> Database:
    """The configured database, created on first use."""
    global _database
    db = _database
    if db is not None:
        return db
    from ._database import Database

    with _lock:
        if _database is None:
            _database = Database.from_settings(_settings)
        return _database
