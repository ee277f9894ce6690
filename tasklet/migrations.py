"""Apply tasklet's Alembic migrations, from a clone or from an installed package.

The scripts live in the repository's top-level ``alembic/`` folder; the wheel
carries a copy as ``tasklet/_alembic``. Both record their progress in
``tasklet_alembic_version``, never in the application's ``alembic_version``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import alembic.context
import alembic.op
from alembic import command
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from . import _config
from ._database import Database
from .schema import TABLE_NAMES, VERSION_TABLE, metadata

__all__ = ["downgrade", "script_location", "upgrade"]

_PACKAGED = Path(__file__).parent / "_alembic"
_SOURCE = Path(__file__).parent.parent / "alembic"
# Any constant works: it only has to be the same in every process that migrates.
_PG_LOCK_KEY = 0x7461736B6C6574


def script_location() -> Path:
    """The folder of tasklet's migration scripts: the packaged copy, else the clone's."""
    for candidate in (_PACKAGED, _SOURCE):
        if (candidate / "env.py").exists():
            return candidate
    raise FileNotFoundError(
        f"tasklet's migrations are missing: looked in {_PACKAGED} and {_SOURCE}"
    )


def alembic_config(db: Database, connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.attributes["tasklet_database"] = db
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(revision: str = "head", *, database: Database | None = None) -> None:
    """Create or update tasklet's tables in the configured database (``tasklet migrate``)."""
    _apply(command.upgrade, revision, database)


def downgrade(revision: str = "base", *, database: Database | None = None) -> None:
    """Undo tasklet's migrations down to ``revision`` (``base`` drops every table)."""
    _apply(command.downgrade, revision, database)


class Outcome(NamedTuple):
    """Where a migration started and ended (None: no tasklet tables), and the latest revision."""

    before: str | None
    after: str | None
    head: str | None


def _apply(run: Callable[[Config, str], None], revision: str, database: Database | None) -> Outcome:
    db = database or _config.database()
    with _outer_alembic_kept(), _migration_connection(db) as conn:
        config = alembic_config(db, conn)
        before = _current_revision(conn)
        run(config, revision)
        after = _current_revision(conn)
    return Outcome(before, after, ScriptDirectory.from_config(config).get_current_head())


@contextlib.contextmanager
def _outer_alembic_kept() -> Iterator[None]:
    """Let an application call :func:`upgrade` from its own Alembic ``env.py``.

    ``alembic.context`` and ``alembic.op`` are process-wide proxies: the nested
    run installs its own and, on leaving, clears them, which would break the
    application's run that is still going on. Put the outer ones back.
    """
    outer = [
        proxy
        for module in (alembic.context, alembic.op)
        if (proxy := getattr(module, "_proxy", None)) is not None
    ]
    try:
        yield
    finally:
        for proxy in outer:
            proxy._install_proxy()


def _current_revision(conn: Connection) -> str | None:
    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


@contextlib.contextmanager
def _migration_connection(db: Database) -> Iterator[Connection]:
    """One transaction for the whole migration, in tasklet's schema, one migrator at a time."""
    with db.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
            if db.schema is not None:
                conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{db.schema}"')
                conn.exec_driver_sql(f'SET LOCAL search_path TO "{db.schema}"')
        yield conn


def tasklet_objects_only(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Autogenerate looks at tasklet's own tables only, never the application's."""
    if type_ == "table":
        return name in TABLE_NAMES
    table = getattr(obj, "table", None)
    return table is None or table.name in TABLE_NAMES


def run_env(context: EnvironmentContext) -> None:
    """The body of ``alembic/env.py``: run the migrations on the connection given or configured."""
    config = context.config
    connection: Connection | None = config.attributes.get("connection")
    if connection is not None:
        _run(context, connection)
        return
    db: Database = config.attributes.get("tasklet_database") or _config.database()
    if context.is_offline_mode():
        _run_offline(context, db)
        return
    with _migration_connection(db) as conn:
        _run(context, conn)


def _run_offline(context: EnvironmentContext, db: Database) -> None:
    """``alembic upgrade head --sql``: print the SQL, in tasklet's schema, touching no database."""
    context.configure(
        url=db.engine.url,
        version_table=VERSION_TABLE,
        literal_binds=True,
        render_as_batch=db.dialect == "sqlite",
    )
    with context.begin_transaction():
        if db.schema is not None:
            context.execute(f'CREATE SCHEMA IF NOT EXISTS "{db.schema}"')
            context.execute(f'SET LOCAL search_path TO "{db.schema}"')
        context.run_migrations()


def _run(context: EnvironmentContext, connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_object=tasklet_objects_only,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
