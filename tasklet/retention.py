"""Retention: finished jobs are deleted once they are old enough, with their runs.

Every worker prunes on a thread of its own (see :class:`Pruner`), so no cron job
is needed; ``tasklet prune`` and :func:`prune` do it on demand.

>>> import tasklet
>>> from datetime import timedelta
>>> tasklet.prune(tasklet.Retention(succeeded=timedelta(hours=1)))  # doctest: +SKIP
{'succeeded': 1200, 'failed': 3, 'cancelled': 0}
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio.to_thread

from . import _config
from ._database import Database
from .storage.retention import jobs_prune

__all__ = ["Retention", "parse_duration", "prune", "prune_async"]

log = logging.getLogger("tasklet.worker")

#: The least pause between two batches. A pause is at least as long as the batch took, so
#: pruning a backlog takes at most half of the database's time (SQLite's write lock).
BATCH_PAUSE_S = 0.01


@dataclass(frozen=True)
class Retention:
    """How long finished jobs are kept, by how they ended; ``None`` keeps them forever.

    Succeeded jobs go after a day; failed and cancelled ones after a week, long
    enough to look into them after a weekend. A job's runs go with it.
    """

    succeeded: dt.timedelta | None = dt.timedelta(days=1)
    failed: dt.timedelta | None = dt.timedelta(days=7)
    #: A cancel is an operator's decision, kept as long as a failure to be looked into.
    cancelled: dt.timedelta | None = dt.timedelta(days=7)
    #: How often each worker prunes; ``None``: workers never prune (use ``tasklet prune``).
    every: dt.timedelta | None = dt.timedelta(minutes=1)
    #: Jobs deleted per statement: each batch is a short transaction of its own.
    batch_size: int = 1000

    def __post_init__(self) -> None:
        for name in ("succeeded", "failed", "cancelled", "every"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, dt.timedelta) or value <= dt.timedelta(0)
            ):
                raise ValueError(
                    f"Retention.{name} must be a positive timedelta, or None (forever), "
                    f"not {value!r}"
                )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise ValueError(f"Retention.batch_size must be an int, not {self.batch_size!r}")
        if self.batch_size < 1:
            raise ValueError(f"Retention.batch_size must be at least 1, not {self.batch_size}")

    def periods(self) -> dict[str, dt.timedelta | None]:
        return {"succeeded": self.succeeded, "failed": self.failed, "cancelled": self.cancelled}


def prune_database(
    db: Database, retention: Retention, *, stopped: Callable[[], bool] = lambda: False
) -> dict[str, int]:
    """Delete every job older than its period, batch by batch; returns counts by status."""
    deleted = dict.fromkeys(retention.periods(), 0)
    pause = threading.Event()
    for status, period in retention.periods().items():
        if period is None:
            continue
        while not stopped():
            began = time.monotonic()
            count = jobs_prune(
                db,
                status=status,
                older_than_s=period.total_seconds(),
                limit=retention.batch_size,
            )
            deleted[status] += count
            if count < retention.batch_size:
                break
            pause.wait(max(BATCH_PAUSE_S, time.monotonic() - began))
    return deleted


def prune(retention: Retention | None = None) -> dict[str, int]:
    """Delete finished jobs older than their retention period, now; returns counts by status.

    Workers do this by themselves every minute; call it (or ``tasklet prune``)
    to clear a backlog at once or when workers are told not to prune.
    """
    return prune_database(_config.database(), retention or Retention())


async def prune_async(retention: Retention | None = None) -> dict[str, int]:
    """:func:`prune` without blocking the event loop."""
    return await anyio.to_thread.run_sync(prune, retention)


class Pruner(threading.Thread):
    """Prunes every ``retention.every`` while a worker runs.

    A thread of its own rather than a step of the lifeline: a large batch (or,
    on SQLite, a wait for the write lock) then never delays a heartbeat, and
    pruning can work through a backlog batch after batch instead of in slices.
    """

    def __init__(self, db: Database, retention: Retention) -> None:
        super().__init__(name="tasklet-pruner", daemon=True)
        self._db = db
        self._retention = retention
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        every = self._retention.every
        assert every is not None
        while not self._stop_event.is_set():
            try:
                deleted = prune_database(self._db, self._retention, stopped=self._stop_event.is_set)
                if any(deleted.values()):
                    log.info("pruned finished jobs and their runs: %s", deleted)
            except Exception as exc:
                log.warning("pruning finished jobs failed (retrying in %s): %s", every, exc)
            self._stop_event.wait(every.total_seconds())


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_FOREVER = ("forever", "never", "none")


def parse_duration(text: str) -> dt.timedelta | None:
    """``30s``, ``15m``, ``12h``, ``1d``, ``2w`` or seconds; ``forever`` (or ``never``) is None."""
    if text.strip().lower() in _FOREVER:
        return None
    match = _DURATION.fullmatch(text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(
            f"{text!r} is not a duration: write a positive number with a unit "
            "(30s, 15m, 12h, 1d, 2w), or 'forever'"
        )
    return dt.timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2) or "s"])


def format_duration(period: dt.timedelta | None) -> str:
    """A duration as :func:`parse_duration` reads it back (``forever`` for None)."""
    if period is None:
        return "forever"
    seconds = period.total_seconds()
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
