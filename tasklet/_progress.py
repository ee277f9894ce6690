"""``tasklet workoff``'s progress: a bar on a terminal, plain log lines otherwise.

The bar is drawn from a thread that reads ``worker.stats`` a few times a
second: the worker itself does nothing more than count its attempts, as it
always does. Attempts are counted, so a job retried during the run counts once
per attempt; the total starts as the jobs due when workoff began and grows if
more get done (retries, jobs deferred meanwhile).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import _registry
from .storage import admin
from .worker import Worker

log = logging.getLogger("tasklet.workoff")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Without a terminal, a progress line this often (and one at the end).
LINE_EVERY_S = 5.0
_QUIET = ("succeeded", "interrupted")  # outcomes that are not errors


@dataclass(frozen=True)
class Tally:
    done: int
    errors: int
    elapsed_s: float

    @property
    def rate(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _tally(worker: Worker, began: float) -> Tally:
    while True:
        try:  # the worker's loop may add an outcome while this thread reads them
            outcomes = Counter(worker.stats.outcomes)
            break
        except RuntimeError:
            continue
    errors = sum(n for kind, n in outcomes.items() if kind not in _QUIET)
    return Tally(sum(outcomes.values()), errors, time.monotonic() - began)


def workoff(worker: Worker, *, log_level: str | None) -> int:
    """Run every due job, showing progress on stderr; exit code 0."""
    console = Console(stderr=True)
    total = admin.jobs_due_count(worker.db, queues=worker.queue_filter, names=_registry.names())
    if console.is_terminal:
        _with_bar(worker, console, total, log_level or "WARNING")
    else:
        _with_lines(worker, total, log_level or "INFO")
    return 0


def _watch(stop: threading.Event, every_s: float, show: Callable[[], None]) -> threading.Thread:
    def loop() -> None:
        while not stop.wait(every_s):
            show()

    thread = threading.Thread(target=loop, name="tasklet-progress", daemon=True)
    thread.start()
    return thread


def _without_traceback(record: logging.LogRecord) -> bool:
    # Under the bar, a failed job is one line; `tasklet jobs show ID` has its traceback.
    record.exc_info, record.exc_text = None, None
    return True


def _with_bar(worker: Worker, console: Console, total: int, level: str) -> None:
    # Log records (warnings, errors) print above the bar instead of breaking it.
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    handler.addFilter(_without_traceback)
    logging.basicConfig(level=level.upper(), format="%(name)s: %(message)s", handlers=[handler])
    progress = Progress(
        TextColumn("[bold]workoff"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("jobs  {task.fields[rate]}"),
        TextColumn("{task.fields[errors]}"),
        TimeElapsedColumn(),
        console=console,
        refresh_per_second=10,
    )
    began = time.monotonic()
    with progress:
        task = progress.add_task("jobs", total=total, rate="", errors="")

        def show() -> None:
            tally = _tally(worker, began)
            errors = f"[red]{tally.errors} errors" if tally.errors else "0 errors"
            progress.update(
                task,
                completed=tally.done,
                total=max(total, tally.done),
                rate=f"{tally.rate:.1f}/s",
                errors=errors,
            )

        stop = threading.Event()
        watcher = _watch(stop, 0.1, show)
        try:
            worker.run_sync(drain=True, handle_signals=True)
        finally:
            stop.set()
            watcher.join()
            show()
    errors = _tally(worker, began).errors
    if errors:
        console.print(
            f"{errors} attempts failed: `tasklet jobs list --status failed` lists the failed jobs,"
            " `tasklet jobs show ID` their tracebacks"
        )


def _with_lines(worker: Worker, total: int, level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    began = time.monotonic()
    log.info("%d jobs due", total)

    def show() -> None:
        tally = _tally(worker, began)
        log.info(
            "%d of %d done, %.1f/s, %d errors",
            tally.done,
            max(total, tally.done),
            tally.rate,
            tally.errors,
        )

    stop = threading.Event()
    watcher = _watch(stop, LINE_EVERY_S, show)
    try:
        worker.run_sync(drain=True, handle_signals=True)
    finally:
        stop.set()
        watcher.join()
        tally = _tally(worker, began)
        log.info(
            "finished %d jobs in %.1fs (%.1f/s), %d errors",
            tally.done,
            tally.elapsed_s,
            tally.rate,
            tally.errors,
        )
