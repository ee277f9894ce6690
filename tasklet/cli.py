"""The ``tasklet`` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from alembic import command
from alembic.util import CommandError
from sqlalchemy import exc
from sqlalchemy.engine import make_url

from . import _config, _discovery, migrations, storage
from ._database import Database
from .errors import TaskletError
from .worker import Worker, WorkerSettings


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
    migrate.add_argument("revision", nargs="?", help="target (default: head; required with --down)")
    migrate.add_argument(
        "--down", action="store_true", help="downgrade to REVISION instead (base drops the tables)"
    )

    for name, text in (
        ("worker", "run jobs until SIGTERM or Ctrl-C (a second signal stops at once)"),
        ("workoff", "run every job that is due, then exit"),
    ):
        worker = commands.add_parser(name, help=text, description=text)
        _worker_arguments(worker)

    clear = commands.add_parser("clear", help="delete queued jobs (running and finished ones stay)")
    clear.add_argument("-q", "--queue", action="append", dest="queues", metavar="QUEUE")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    dashboard = commands.add_parser(
        "dashboard", help="serve the web dashboard (credentials: $TASKLET_DASHBOARD_USER/PASSWORD)"
    )
    dashboard.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine)")
    dashboard.add_argument("--port", type=int, default=8080, help="default 8080")
    dashboard.add_argument("--user", help="user name (default: $TASKLET_DASHBOARD_USER)")
    return parser


def _worker_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = WorkerSettings()
    parser.add_argument(
        "-q",
        "--queue",
        action="append",
        dest="queues",
        metavar="QUEUE",
        help="take jobs from this queue (repeatable; default: every queue)",
    )
    parser.add_argument(
        "-c",
        "--concurrency",
        type=int,
        default=defaults.concurrency,
        help=f"jobs run at once (default {defaults.concurrency})",
    )
    parser.add_argument(
        "-i",
        "--import",
        action="append",
        dest="imports",
        default=[],
        metavar="MODULE",
        help="module defining jobs (repeatable; added to [tool.tasklet] imports, TASKLET_IMPORTS)",
    )
    timing = parser.add_argument_group("timing (seconds)")
    timing.add_argument(
        "--grace",
        type=float,
        default=defaults.grace_s,
        help=f"on shutdown, time running jobs get to finish (default {defaults.grace_s:g})",
    )
    timing.add_argument(
        "--poll",
        type=float,
        default=defaults.poll_s,
        help=f"safety-net poll for scheduled jobs (default {defaults.poll_s:g})",
    )
    timing.add_argument("--heartbeat", type=float, default=defaults.heartbeat_s)
    timing.add_argument(
        "--lost-after",
        type=float,
        default=defaults.lost_after_s,
        help=f"a worker silent this long is dead (default {defaults.lost_after_s:g})",
    )
    timing.add_argument("--sweep", type=float, default=defaults.sweep_s)
    parser.add_argument("--log-level", default="INFO", help="default INFO")


def _run_worker(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    directory = Path.cwd()
    _discovery.import_modules(_discovery.configured_modules(directory, args.imports), directory)
    settings = WorkerSettings(
        queues=tuple(args.queues or ()),
        concurrency=args.concurrency,
        grace_s=args.grace,
        poll_s=args.poll,
        heartbeat_s=args.heartbeat,
        lost_after_s=args.lost_after,
        sweep_s=args.sweep,
    )
    worker = Worker(settings, database=_open_database())
    worker.run_sync(drain=args.command == "workoff", handle_signals=True)
    return 0


def _clear(args: argparse.Namespace) -> int:
    db = _open_database()
    queues = args.queues or None
    what = f"queued jobs of {', '.join(queues)}" if queues else "all queued jobs"
    if not args.yes:
        if not sys.stdin.isatty():
            raise TaskletError(f"refusing to delete {what} without confirmation: pass --yes")
        answer = input(f"Delete {what} in {_where(db)}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("tasklet: nothing deleted")
            return 1
    deleted = storage.jobs_clear(db, queues=queues)
    print(f"tasklet: deleted {deleted} queued jobs")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    try:
        from .dashboard import serve
    except ImportError as error:
        raise TaskletError("the dashboard needs: pip install 'tasklet[dashboard]'") from error
    _open_database()
    serve(args.host, args.port, username=args.user)
    return 0


def _where(db: Database) -> str:
    return db.display_url if db.schema is None else f"{db.display_url} (schema {db.schema})"


def _label(revision: str | None, head: str | None) -> str:
    if revision is None:
        return "base"
    return f"{revision} (head)" if revision == head else revision


def _migrate(args: argparse.Namespace) -> int:
    db = _open_database()
    if args.down:
        outcome = migrations._apply(command.downgrade, args.revision, db)
        verb = "downgraded"
    else:
        outcome = migrations._apply(command.upgrade, args.revision or "head", db)
        verb = "upgraded"
    before, after = _label(outcome.before, outcome.head), _label(outcome.after, outcome.head)
    if outcome.before == outcome.after:
        print(f"tasklet: {_where(db)} is already at {after}: nothing to do")
    else:
        print(f"tasklet: {verb} {_where(db)} from {before} to {after}")
    return 0


def _open_database() -> Database:
    try:
        return _config.database()
    except (exc.ArgumentError, ImportError) as error:  # unparsable URL, driver not installed
        raise TaskletError(f"cannot use the database URL {_display_url()}: {error}") from error


def _display_url() -> str:
    """The configured URL with its password hidden, even when it does not parse."""
    raw = _config.settings().resolved_url()
    try:
        return make_url(raw).render_as_string(hide_password=True)
    except exc.ArgumentError:
        userinfo_end = raw.rfind("@")
        if userinfo_end == -1:
            return raw
        start = raw.find("//") + 2 if "//" in raw[:userinfo_end] else 0
        colon = raw.find(":", start, userinfo_end)
        if colon == -1:
            return raw
        return f"{raw[: colon + 1]}***{raw[userinfo_end:]}"


def _error_message(error: Exception) -> str:
    """What went wrong, in one line a user can act on, never showing the password."""
    if isinstance(error, exc.DBAPIError):
        reason = " ".join(str(error.orig).split())
        if error.statement is None:  # raised while connecting
            return f"cannot reach the database at {_display_url()}: {reason}"
        return f"the database refused a statement in {_display_url()}: {reason}"
    return " ".join(str(error).split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "migrate" and args.down and args.revision is None:
        parser.error("migrate --down needs a REVISION (`tasklet migrate --down base` drops tables)")
    configured = args.database_url is not None or args.schema is not None
    if configured:
        _config.configure(args.database_url, schema=args.schema)
    commands = {
        "migrate": _migrate,
        "worker": _run_worker,
        "workoff": _run_worker,
        "clear": _clear,
        "dashboard": _dashboard,
    }
    try:
        return commands[args.command](args)
    except (TaskletError, CommandError, exc.DBAPIError) as error:
        print(f"tasklet: {_error_message(error)}", file=sys.stderr)
        return 1
    finally:
        if configured:
            _config.configure()  # closes the engine this call made
