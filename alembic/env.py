"""Alembic environment for tasklet's migrations: all the logic is in tasklet.migrations."""

import logging.config

from alembic import context

from tasklet.migrations import run_env

if context.config.config_file_name is not None and not context.config.attributes.get("connection"):
    logging.config.fileConfig(context.config.config_file_name, disable_existing_loggers=False)

# alembic.context is a module proxying the current EnvironmentContext.
run_env(context)  # type: ignore[arg-type]
