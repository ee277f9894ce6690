"""Cancelling jobs: :func:`cancel`, and how a worker delivers a cancel to a running attempt.

A request reaches the worker holding the job in up to three ways, whichever
comes first: at once in this process (in-process pub/sub); within milliseconds
on PostgreSQL (NOTIFY on the control channel); and by the worker's own look at
its running jobs, every ``cancel_check_s`` (0.5 s) on SQLite, and on every
heartbeat on PostgreSQL as a safety net for a notification that was lost. A
message for a job the worker does not run makes it look again shortly: the job
may be one it has just claimed and not yet started.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

import anyio
import anyio.to_thread

from . import _config, _wakeup, storage
from .errors import JobNotFoundError

if TYPE_CHECKING:
    from ._database import Database
    from ._executor import Attempt

__all__ = ["cancel", "cancel_async"]

log = logging.getLogger("tasklet.worker")

#: A cancel for a job this worker does not run may be for one it has just claimed and
#: not yet started: it looks again this much later.
RECHECK_S: Final = 0.1


def cancel(job_id: int) -> bool:
    """Cancel a job. Returns True if it is cancelled or being cancelled, False if it had ended.

    * A queued or scheduled job never runs: it is ``cancelled`` at once.
    * A running job is asked to stop, and is never retried. An async job is
      cancelled at its next ``await``. A sync job sees ``ctx.cancelled``
      become true and should stop by raising (``tasklet.Cancel``, say):
      the job is then ``cancelled``; if it returns normally instead, it
      ``succeeded`` with its result. Either way it ends; this call does not
      wait for that.
    * A job that has already ended (succeeded, failed, cancelled) is left as it
      is: the call returns False.

    Raises :class:`~tasklet.JobNotFoundError` for an id no job has (never
    created, or deleted).
    """
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        raise TypeError(
            f"cancel() takes a job id (an int, e.g. handle.id), not {type(job_id).__qualname__}"
        )
    return cancel_job(_config.database(), job_id) != "finished"


def cancel_job(db: Database, job_id: int) -> str:
    """:func:`cancel` on ``db``, saying what became of the job.

    ``"cancelled"`` (it had not started), ``"requested"`` (it runs and its worker
    is told) or ``"finished"`` (it had ended; nothing changed).
    """
    result = storage.job_cancel(db, job_id)
    if result == "missing":
        raise JobNotFoundError(
            f"there is no job with id {job_id}: it was never created, or it was deleted"
        )
    if result == "requested":
        # This process's own workers hear of it now, whatever the database.
        _wakeup.publish_control(db.wake_key, storage.cancel_payload(job_id))
    return result


async def cancel_async(job_id: int) -> bool:
    """:func:`cancel` without blocking the event loop."""
    return await anyio.to_thread.run_sync(cancel, job_id)


class CancelWatch:
    """A worker's side of cancelling: finds the requests for its running attempts and delivers them.

    Runs on the worker's event loop; :meth:`on_control` takes the messages
    the listener and this process's :func:`cancel` calls send.
    """

    def __init__(
        self, db: Database, worker_id: str, attempts: dict[int, Attempt], every_s: float
    ) -> None:
        self._db = db
        self._worker_id = worker_id
        self._attempts = attempts
        self._every_s = every_s
        self._look = anyio.Event()

    def on_control(self, message: str | None) -> None:
        if message is None:
            self._look.set()
        elif message.startswith(storage.CANCEL_PREFIX):
            try:
                job_id = int(message[len(storage.CANCEL_PREFIX) :])
            except ValueError:
                return
            if not self._deliver(job_id):
                asyncio.get_running_loop().call_later(RECHECK_S, self.on_control, None)

    def _deliver(self, job_id: int) -> bool:
        """Cancel the attempt of this job if this worker runs it; whether it does."""
        attempt = self._attempts.get(job_id)
        if attempt is None:
            return False
        if not attempt.cancel_requested:
            log.info("job %d %s: cancel requested; stopping it", job_id, attempt.row.name)
            attempt.request_cancel()
        return True

    async def run(self) -> None:
        """Look for requests every ``every_s``, or when told to, while attempts run."""
        while True:
            with anyio.move_on_after(self._every_s):
                await self._look.wait()
            self._look = anyio.Event()
            if not self._attempts:
                continue
            try:
                requested = await anyio.to_thread.run_sync(
                    storage.jobs_cancel_requested, self._db, self._worker_id
                )
            except Exception as exc:  # the database is away: the next look will do
                log.warning("could not look for cancelled jobs: %s", exc)
                continue
            for job_id in requested:
                self._deliver(job_id)
