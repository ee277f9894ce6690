"""The shop's Alembic environment: tasklet's migrations first, then the shop's own.

tasklet's tables have their own Alembic history, recorded in
``tasklet_alembic_version``; ``tasklet.upgrade()`` applies it (idempotent, so
any alembic command may run it). The shop's history stays in ``alembic_version``,
and autogenerate leaves tasklet's tables alone.
"""

import logging.config
from typing import Any

from alembic import context
from shop.models import Base, engine

import tasklet
from tasklet.schema import TABLE_NAMES, VERSION_TABLE

TASKLET_TABLES = TABLE_NAMES | {VERSION_TABLE}

if context.config.config_file_name is not None:
    logging.config.fileConfig(context.config.config_file_name, disable_existing_loggers=False)


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Autogenerate compares the shop's tables only: tasklet's belong to tasklet's migrations."""
    return not (type_ == "table" and name in TASKLET_TABLES)


def run_migrations_offline() -> None:
    """``alembic upgrade head --sql``: the shop's SQL (``tasklet migrate`` has its own)."""
    context.configure(url=engine.url, target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    tasklet.upgrade()  # in a transaction of its own, before the shop's
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            include_object=include_object,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
