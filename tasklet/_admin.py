"""The admin commands: ``status``, ``jobs list|show|retry`` and ``workers``.

Each command reads or changes the database through ``storage.admin`` and
prints either tables for people (rich) or, with ``--json``, one JSON document
on stdout for scripts. Each is ``command(db, args) -> exit code``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.json import JSON
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from . import _wakeup, storage
from ._cancel import cancel_job
from ._database import Database
from .errors import TaskletError
from .storage import admin
from .storage.rows import JobRow, RunRow


def _console() -> Console:
    # Wide enough for ids and errors when piped; a terminal uses its own width.
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def _emit_json(document: Any) -> int:
    json.dump(document, sys.stdout, indent=2, default=_json_default)
    sys.stdout.write("\n")
    return 0


def _json_default(value: object) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    raise TypeError(f"{type(value).__name__} is not JSON")


def age(seconds: float | None) -> str:
    """A duration as people read it: 45s, 3m 20s, 2h 5m, 4d 1h."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    for unit, size, smaller, small_size in (
        ("d", 86400, "h", 3600),
        ("h", 3600, "m", 60),
        ("m", 60, "s", 1),
    ):
        if whole >= size:
            rest = (whole % size) // small_size
            return f"{whole // size}{unit} {rest}{smaller}" if rest else f"{whole // size}{unit}"
    return f"{whole}s"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _since(now: dt.datetime, then: dt.datetime | None) -> float | None:
    return None if then is None else (now - then).total_seconds()


def _serves(worker: admin.WorkerRow, queue: str) -> bool:
    return not worker.queues or queue in worker.queues


# ----------------------------------------------------------------- status


def status(db: Database, args: argparse.Namespace) -> int:
    snap = admin.status_snapshot(db, lost_after_s=args.lost_after)
    queues = {q.queue: q for q in snap.queues}
    for worker in snap.workers:  # a queue with workers and no jobs still shows
        for queue in worker.queues:
            queues.setdefault(queue, admin.QueueCounts(queue=queue))
    rows: list[dict[str, Any]] = [
        {
            "queue": q.queue,
            "queued": q.queued,
            "scheduled": q.scheduled,
            "running": q.running,
            "failed": q.failed,
            "oldest_waiting_s": _since(snap.now, q.oldest_due_at),
            "paused": q.paused_at is not None,
            "paused_at": q.paused_at,
            "workers": sum(_serves(w, q.queue) for w in snap.workers),
        }
        for q in sorted(queues.values(), key=lambda q: q.queue)
    ]
    if args.json:
        return _emit_json({"now": snap.now, "queues": rows, "workers_alive": len(snap.workers)})
    console = _console()
    if not rows:
        console.print("No jobs and no workers.", f"(database: {db.display_url})")
        return 0
    table = Table(box=box.SIMPLE_HEAD, title_justify="left")
    for column, justify in (
        ("queue", "left"),
        ("queued", "right"),
        ("scheduled", "right"),
        ("running", "right"),
        ("failed", "right"),
        ("oldest waiting", "right"),
        ("paused", "left"),
        ("workers", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(
            row["queue"],
            str(row["queued"]),
            str(row["scheduled"]),
            str(row["running"]),
            Text(str(row["failed"]), style="red" if row["failed"] else ""),
            age(row["oldest_waiting_s"]),
            Text("paused", style="yellow") if row["paused"] else "",
            Text(str(row["workers"]), style="" if row["workers"] else "yellow"),
        )
    console.print(table)
    console.print(f"{len(snap.workers)} workers alive (heartbeat within {args.lost_after:g}s)")
    return 0


# ------------------------------------------------------------------- jobs


def _job_document(job: JobRow) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "queue": job.queue,
        "status": job.status,
        "priority": job.priority,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "lost_count": job.lost_count,
        "timeout": job.timeout,
        "run_at": job.run_at,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "locked_by": job.locked_by,
        "lease": job.lease,
        "last_error": job.last_error,
        "unique_key": job.unique_key,
        "concurrency_key": job.concurrency_key,
        "concurrency_limit": job.concurrency_limit,
        "cancel_requested_at": job.cancel_requested_at,
        "trace_context": job.trace_context,
        "serializer": job.serializer,
    }
    if job.serializer == "pickle":
        size = len(job.args_pickle or b"")
        document["args"] = None
        document["args_pickled"] = f"<pickled, {size} bytes: opaque to tasklet's tools>"
    else:
        document["args"] = job.args
    return document


def _run_document(run: RunRow) -> dict[str, Any]:
    return {
        "attempt": run.attempt,
        "outcome": run.outcome,
        "worker_id": run.worker_id,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "error": run.error,
        "traceback": run.traceback,
        "result": run.result,
    }


def _when(value: dt.datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _one_line(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


_STATUS_STYLES = {"failed": "red", "running": "cyan", "succeeded": "green", "cancelled": "dim"}


def jobs_list(db: Database, args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise TaskletError("--limit must be at least 1")
    page = admin.jobs_page(
        db,
        queue=args.queue,
        status=args.status,
        name=args.name,
        limit=args.limit,
        before=args.before,
    )
    more = page[-1].id if len(page) == args.limit else None
    if args.json:
        return _emit_json({"jobs": [_job_document(j) for j in page], "next_before": more})
    console = _console()
    if not page:
        console.print("No jobs match.")
        return 0
    table = Table(box=box.SIMPLE_HEAD)
    columns = (
        "id",
        "name",
        "queue",
        "status",
        "attempts",
        "run at (UTC)",
        "finished",
        "last error",
    )
    for column in columns:
        table.add_column(column, justify="right" if column == "id" else "left", overflow="fold")
    for job in page:
        table.add_row(
            str(job.id),
            job.name,
            job.queue,
            Text(job.status, style=_STATUS_STYLES.get(job.status, "")),
            f"{job.attempts}/{job.max_attempts}",
            _when(job.run_at),
            _when(job.finished_at),
            _one_line(job.last_error),
        )
    console.print(table)
    if more is not None:
        console.print(f"More: tasklet jobs list --before {more} (same filters)", style="dim")
    return 0


def jobs_show(db: Database, args: argparse.Namespace) -> int:
    job = storage.job_get(db, args.id)
    if job is None:
        raise TaskletError(f"there is no job {args.id} (it may have been deleted by retention)")
    runs = storage.job_runs_list(db, job.id)
    if args.json:
        return _emit_json({"job": _job_document(job), "runs": [_run_document(r) for r in runs]})
    console = _console()
    document = _job_document(job)
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column()
    for key, value in document.items():
        if key in ("args", "args_pickled") or value is None:
            continue
        shown = _when(value) if isinstance(value, dt.datetime) else str(value)
        style = _STATUS_STYLES.get(shown, "") if key == "status" else ""
        fields.add_row(key, Text(shown, style=style))
    title = f"job {job.id} (times in UTC)"
    console.print(Panel(fields, title=title, title_align="left", expand=False))
    if job.serializer == "pickle":
        console.print("arguments:", document["args_pickled"])
    else:
        console.print("arguments:")
        console.print(JSON.from_data(job.args or {}))
    if not runs:
        console.print("No attempts recorded yet.")
    for run in runs:
        duration = (
            None if run.started_at is None else (run.finished_at - run.started_at).total_seconds()
        )
        head = Text.assemble(
            (f"attempt {run.attempt}: ", "bold"),
            (run.outcome, _STATUS_STYLES.get(run.outcome, "red")),
            f"  {_when(run.finished_at)}  took {age(duration)}  on {run.worker_id or '-'}",
        )
        parts: list[Any] = [head]
        if run.error:
            parts.append(Text(run.error, style="red"))
        if run.traceback:
            parts.append(Text(run.traceback.rstrip(), style="dim"))
        if run.result is not None:
            parts.append(Text(f"result: {json.dumps(run.result)}"))
        console.print(Group(*parts))
    return 0


def jobs_retry(db: Database, args: argparse.Namespace) -> int:
    if (args.id is None) == (not args.all_failed):
        raise TaskletError("give a job ID or --all-failed (with --queue to limit it)")
    if args.id is not None and args.queue:
        raise TaskletError("--queue goes with --all-failed, not with a job ID")
    outcome = admin.jobs_retry(
        db,
        ids=() if args.id is None else (args.id,),
        all_failed=args.all_failed,
        queues=args.queue or None,
    )
    _wakeup.publish(db.wake_key, {queue for _, queue in outcome.retried})
    ids = [job_id for job_id, _ in outcome.retried]
    code = 1 if args.id is not None and not ids else 0
    if args.json:
        _emit_json({"retried": ids, "skipped": {str(k): v for k, v in outcome.skipped.items()}})
        return code
    for job_id, reason in outcome.skipped.items():
        print(f"tasklet: job {job_id} not retried: {reason}", file=sys.stderr)
    if ids:
        shown = ", ".join(map(str, ids[:20])) + (" …" if len(ids) > 20 else "")
        print(f"tasklet: retried {_plural(len(ids), 'job')}, due now: {shown}")
    elif args.all_failed:
        print("tasklet: no failed jobs to retry")
    return code


def jobs_cancel(db: Database, args: argparse.Namespace) -> int:
    outcome = cancel_job(db, args.id)
    if args.json:
        _emit_json({"id": args.id, "outcome": outcome})
        return 0 if outcome != "finished" else 1
    messages = {
        "cancelled": f"tasklet: job {args.id} cancelled; it will not run",
        "requested": f"tasklet: job {args.id} is running; its worker was asked to stop it",
        "finished": f"tasklet: job {args.id} had already ended; nothing changed",
    }
    print(messages[outcome], file=sys.stdout if outcome != "finished" else sys.stderr)
    return 0 if outcome != "finished" else 1


# ---------------------------------------------------------------- workers


def workers(db: Database, args: argparse.Namespace) -> int:
    alive, now = admin.workers_alive(db, lost_after_s=args.lost_after)
    rows: list[dict[str, Any]] = [
        {
            "id": w.id,
            "host": w.host,
            "pid": w.pid,
            "queues": list(w.queues),
            "concurrency": w.concurrency,
            "started_at": w.started_at,
            "heartbeat_age_s": _since(now, w.heartbeat_at),
        }
        for w in alive
    ]
    if args.json:
        return _emit_json({"now": now, "workers": rows})
    console = _console()
    if not rows:
        console.print(f"No worker alive (none heartbeat within {args.lost_after:g}s).")
        return 0
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("id", "host", "pid", "queues", "concurrency", "up", "heartbeat"):
        table.add_column(column, justify="right" if column in ("pid", "concurrency") else "left")
    for row, w in zip(rows, alive, strict=True):
        table.add_row(
            row["id"],
            row["host"],
            str(row["pid"]),
            ", ".join(w.queues) or "(all)",
            str(row["concurrency"]),
            age(_since(now, w.started_at)),
            f"{age(row['heartbeat_age_s'])} ago",
        )
    console.print(table)
    return 0
