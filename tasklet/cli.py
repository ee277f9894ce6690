"""The ``tasklet`` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alembic import command
from alembic.util import CommandError
from sqlalchemy import exc
from sqlalchemy.engine import make_url

from . import (
    _admin,
    _config,
    _discovery,
    _progress,
    _queues,
    _start,
    migrations,
    storage,
    supervisor,
)
from ._database import Database
from .errors import TaskletError
from .retention import Retention, format_duration, parse_duration, prune_database
from .schema import JOB_STATUSES
from .worker import Worker, WorkerSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tasklet",
        description="Background jobs on PostgreSQL or SQLite: migrate, run workers, inspect and "
        "act on jobs and queues.",
    )
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
    _queue_arguments(commands)
    _admin_parsers(commands)
    _process_parsers(commands)
    prune = commands.add_parser(
        "prune",
        help="delete finished jobs older than their retention period, with their runs",
        description="Delete finished jobs older than their retention period, with their runs "
        "(workers also do this by themselves every minute).",
    )
    _retention_arguments(prune)
    prune.add_argument(
        "--batch-size",
        type=int,
        default=Retention().batch_size,
        help=f"jobs deleted per statement (default {Retention().batch_size})",
    )

    dashboard = commands.add_parser(
        "dashboard", help="serve the web dashboard (credentials: $TASKLET_DASHBOARD_USER/PASSWORD)"
    )
    dashboard.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine)")
    dashboard.add_argument("--port", type=int, default=8080, help="default 8080")
    dashboard.add_argument("--user", help="user name (default: $TASKLET_DASHBOARD_USER)")
    return parser


def _queue_arguments(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queue = commands.add_parser("queue", help="pause, resume or list queues")
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("pause", "workers start no job of QUEUE until it is resumed (it still takes jobs)"),
        ("resume", "workers start jobs of QUEUE again, at once"),
    ):
        parser = actions.add_parser(action, help=text, description=text)
        parser.add_argument("name", metavar="QUEUE")
    actions.add_parser("list", help="queues with queued or running jobs, and paused queues")


def _process_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``start``, ``stop``, ``restart`` and ``supervise``: worker processes under a supervisor."""
    for name, text in (
        ("start", "start worker processes in the background, restarted if they die"),
        ("restart", "stop, then start (the same workers unless -n says otherwise)"),
        ("supervise", "run worker processes in the foreground, restarted if they die"),
        ("stop", "stop the workers that `tasklet start` started, gracefully"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(process_command=getattr(_start, name))
        sub.add_argument("-n", "--workers", metavar="SPEC", help=supervisor.SPEC_HELP)
        sub.add_argument(
            "--state-dir",
            default=".tasklet",
            help="pidfile, log and lock of the supervisor (default .tasklet)",
        )
        if name != "stop":
            _worker_arguments(sub, queues=False)


def _admin_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``status``, ``jobs ...``, ``workers``: each sets ``handler(db, args) -> exit code``."""
    lost_after = WorkerSettings().lost_after_s

    def admin_command(
        group: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=text, description=text)
        sub.add_argument("--json", action="store_true", help="one JSON document on stdout")
        return sub

    status = admin_command(commands, "status", "jobs per queue and state, paused queues, workers")
    status.set_defaults(handler=_admin.status)
    workers = admin_command(commands, "workers", "alive workers: queues, concurrency, heartbeat")
    workers.set_defaults(handler=_admin.workers)
    for sub in (status, workers):
        sub.add_argument(
            "--lost-after",
            type=float,
            default=lost_after,
            help=f"a worker silent this long is not alive (default {lost_after:g})",
        )

    jobs = commands.add_parser("jobs", help="list, show, retry and cancel jobs")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")
    listing = admin_command(jobs_commands, "list", "jobs, newest first")
    listing.set_defaults(handler=_admin.jobs_list)
    listing.add_argument("-q", "--queue")
    listing.add_argument("-s", "--status", choices=JOB_STATUSES)
    listing.add_argument("-n", "--name", help="the job's name (module.function)")
    listing.add_argument("-l", "--limit", type=int, default=50, help="default 50")
    listing.add_argument(
        "--before", type=int, metavar="ID", help="the page after job ID (given on the page before)"
    )
    show = admin_command(jobs_commands, "show", "a job's columns, arguments and every attempt")
    show.set_defaults(handler=_admin.jobs_show)
    show.add_argument("id", type=int, metavar="ID")
    retry = admin_command(
        jobs_commands, "retry", "put failed (or cancelled) jobs back in their queue, due now"
    )
    retry.set_defaults(handler=_admin.jobs_retry)
    retry.add_argument("id", type=int, nargs="?", metavar="ID")
    retry.add_argument("--all-failed", action="store_true", help="every failed job")
    retry.add_argument(
        "-q", "--queue", action="append", metavar="QUEUE", help="with --all-failed (repeatable)"
    )
    cancel = admin_command(
        jobs_commands, "cancel", "a queued job never runs; a running one is asked to stop"
    )
    cancel.set_defaults(handler=_admin.jobs_cancel)
    cancel.add_argument("id", type=int, metavar="ID")


def _duration(text: str) -> dt.timedelta | None:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _retention_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Retention()
    group = parser.add_argument_group(
        "retention (durations such as 30s, 15m, 12h, 1d, 2w, or 'forever')"
    )
    for status, text in (
        ("succeeded", "succeeded jobs"),
        ("failed", "failed jobs"),
        ("cancelled", "cancelled jobs"),
    ):
        group.add_argument(
            f"--keep-{status}",
            type=_duration,
            default=getattr(defaults, status),
            metavar="DURATION",
            help=f"keep {text} this long (default {format_duration(getattr(defaults, status))})",
        )


def _retention(args: argparse.Namespace, **changes: Any) -> Retention:
    return dataclasses.replace(
        Retention(),
        succeeded=args.keep_succeeded,
        failed=args.keep_failed,
        cancelled=args.keep_cancelled,
        **changes,
    )


def _worker_arguments(parser: argparse.ArgumentParser, *, queues: bool = True) -> None:
    defaults = WorkerSettings()
    parser.add_argument(
        "-q",
        "--queue",
        action="append",
        dest="queues",
        metavar="QUEUE",
        # Under a supervisor the queues come from -n; -q is then refused with a message.
        help="take jobs from this queue (repeatable; default: every queue); QUEUE=N gives "
        "it N slots of its own, apart from --concurrency"
        if queues
        else argparse.SUPPRESS,
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
    _retention_arguments(parser)
    parser.add_argument(
        "--prune-every",
        type=_duration,
        default=defaults.retention.every,
        metavar="DURATION",
        help="how often this worker deletes finished jobs past their retention ('never': "
        f"leave it to `tasklet prune`; default {format_duration(defaults.retention.every)})",
    )
    parser.add_argument(
        "--log-level", help="default INFO (WARNING under workoff's progress bar on a terminal)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on this port (needs tasklet[metrics])",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address the metrics endpoint binds (default 127.0.0.1)",
    )
    parser.add_argument(
        "--no-schedules",
        action="store_false",
        dest="schedules",
        help="do not enqueue the recurring schedules (@periodic) of the jobs (worker only)",
    )


def _queue_slots(given: list[str] | None) -> tuple[tuple[str, ...], dict[str, int]]:
    """``-q email=4 -q default``: the queues, and those with slots of their own."""
    queues: list[str] = []
    slots: dict[str, int] = {}
    for text in given or ():
        queue, equals, count = text.rpartition("=")
        if not equals:
            queues.append(text)
            continue
        if not queue or not count.isdigit() or int(count) < 1:
            raise TaskletError(
                f"-q {text!r}: give a queue, or QUEUE=N with N slots of its own (e.g. email=4)"
            )
        queues.append(queue)
        slots[queue] = int(count)
    return tuple(queues), slots


def _run_worker(args: argparse.Namespace) -> int:
    if args.command == "worker":
        logging.basicConfig(level=(args.log_level or "INFO").upper(), format=_progress.LOG_FORMAT)
    directory = Path.cwd()
    _discovery.import_modules(_discovery.configured_modules(directory, args.imports), directory)
    queues, slots = _queue_slots(args.queues)
    settings = WorkerSettings(
        queues=queues,
        queue_slots=slots,
        concurrency=args.concurrency,
        grace_s=args.grace,
        poll_s=args.poll,
        heartbeat_s=args.heartbeat,
        lost_after_s=args.lost_after,
        sweep_s=args.sweep,
        retention=_retention(args, every=args.prune_every),
        schedules=args.schedules,
    )
    worker = Worker(settings, database=_open_database())
    metrics = None
    if args.metrics_port is not None:
        from .metrics import WorkerMetrics

        metrics = WorkerMetrics(worker)
        port = metrics.serve(args.metrics_port, args.metrics_host)
        logging.getLogger("tasklet.worker").info(
            "metrics on http://%s:%d/metrics", args.metrics_host, port
        )
    try:
        if args.command == "workoff":
            return _progress.workoff(worker, log_level=args.log_level)
        worker.run_sync(handle_signals=True)
    finally:
        if metrics is not None:
            metrics.close()
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


def _queue(args: argparse.Namespace) -> int:
    db = _open_database()
    if args.action == "list":
        rows = storage.queues_list(db)
        width = max([len("QUEUE"), *(len(r.name) for r in rows)])
        print(f"{'QUEUE':<{width}}  {'QUEUED':>8}  {'RUNNING':>8}  PAUSED SINCE")
        for r in rows:
            since = "-" if r.paused_at is None else r.paused_at.isoformat(timespec="seconds")
            print(f"{r.name:<{width}}  {r.queued:>8}  {r.running:>8}  {since}")
        return 0
    change = _queues.pause_queue if args.action == "pause" else _queues.resume_queue
    try:
        changed = change(args.name)
    except ValueError as error:
        raise TaskletError(str(error)) from None
    messages = {
        ("pause", True): "paused queue {!r}: it takes jobs and running ones finish, none starts",
        ("pause", False): "queue {!r} was already paused",
        ("resume", True): "resumed queue {!r}",
        ("resume", False): "queue {!r} was not paused",
    }
    print("tasklet: " + messages[args.action, changed].format(args.name))
    return 0


def _prune(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise TaskletError(f"--batch-size must be at least 1, not {args.batch_size}")
    retention = _retention(args, batch_size=args.batch_size)
    deleted = prune_database(_open_database(), retention)
    parts = []
    for status, period in retention.periods().items():
        if period is None:
            parts.append(f"{status} kept forever")
        else:
            parts.append(f"{deleted[status]} {status} (older than {format_duration(period)})")
    print(
        f"tasklet: deleted {sum(deleted.values())} finished jobs and their runs: {', '.join(parts)}"
    )
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
        "queue": _queue,
        "prune": _prune,
        "dashboard": _dashboard,
    }
    try:
        handler = getattr(args, "handler", None)
        if handler is not None:
            return int(handler(_open_database(), args))
        process_command = getattr(args, "process_command", None)
        if process_command is not None:
            return int(process_command(args))
        return commands[args.command](args)
    except (TaskletError, CommandError, exc.DBAPIError) as error:
        print(f"tasklet: {_error_message(error)}", file=sys.stderr)
        return 1
    finally:
        if configured:
            _config.configure()  # closes the engine this call made
