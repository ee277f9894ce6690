"""Pausing and resuming queues: a paused queue accepts jobs, but no worker starts them."""

from __future__ import annotations

import datetime as dt

from . import _config, _wakeup, storage
from ._defer import check_name

__all__ = ["pause_queue", "paused_queues", "resume_queue"]


def pause_queue(queue: str) -> bool:
    """Stop workers from starting jobs of ``queue``; False if it was already paused.

    The queue keeps accepting jobs, and jobs already running finish. Every
    worker, on every machine, leaves the queue's jobs alone until
    :func:`resume_queue`.

    >>> tasklet.pause_queue("email")  # doctest: +SKIP
    True
    """
    check_name("queue", queue)
    return storage.queue_pause(_config.database(), queue)


def resume_queue(queue: str) -> bool:
    """Let workers start jobs of ``queue`` again, at once; False if it was not paused."""
    check_name("queue", queue)
    db = _config.database()
    resumed = storage.queue_resume(db, queue)
    if resumed:
        # PostgreSQL workers hear the resume's NOTIFY; this process's, right now.
        _wakeup.publish(db.wake_key, [queue])
    return resumed


def paused_queues() -> dict[str, dt.datetime]:
    """The paused queues, by name, with the time (UTC) each was paused."""
    return storage.queues_paused(_config.database())
