"""The ``tasklet`` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import _config, migrations
from .errors import TaskletError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tasklet", description=__doc__)
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="database to use (default: $TASKLET_DATABASE_URL, else sqlite:///tasklet.db)",
    )
    parser.add_argument(
        "--schema", help="PostgreSQL schema of tasklet's tables (default: $TASKLET_SCHEMA)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser("migrate", help="create or update tasklet's tables")
    migrate.add_argument("revision", nargs="?", default="head", help="target (default: head)")
    migrate.add_argument(
        "--down", action="store_true", help="downgrade to REVISION instead (base drops the tables)"
    )
    return parser


def _migrate(args: argparse.Namespace) -> int:
    if args.down:
        migrations.downgrade(args.revision)
        print(f"tasklet: downgraded to {args.revision} in {_config.database().display_url}")
    else:
        migrations.upgrade(args.revision)
        print(f"tasklet: migrated to {args.revision} in {_config.database().display_url}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.database_url is not None or args.schema is not None:
        _config.configure(args.database_url, schema=args.schema)
    try:
        return _migrate(args)
    except TaskletError as error:
        print(f"tasklet: {error}", file=sys.stderr)
        return 1
