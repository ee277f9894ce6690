"""What a running job may know about itself."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["JobContext"]


@dataclass(frozen=True)
class JobContext:
    """Handed to a job function that declares a parameter annotated ``JobContext``.

    The parameter is filled by tasklet and is not one of the deferred arguments::

        @job(queue="email")
        async def sync_contacts(ctx: JobContext, account_id: int) -> dict: ...

        sync_contacts.defer(account_id=7)

    Called directly (``sync_contacts(account_id=7)`` in a unit test), the job
    gets an inline context whose ``job_id`` is ``None``.
    """

    job_id: int | None
    name: str
    queue: str
    attempt: int
    max_attempts: int
    scheduled_at: dt.datetime | None
    worker_id: str | None
    #: In ``after_failure`` hooks: whether the job will be attempted again.
    will_retry: bool | None = None
    _cancel: threading.Event | None = field(default=None, repr=False, compare=False)

    @property
    def state(self) -> Mapping[str, Any]:
        """The worker's shared state: what its ``@tasklet.worker_lifespan`` functions yielded.

        Created once per worker process (a connection pool, an HTTP client), read-only,
        shared by every job the worker runs; empty when the job is called inline.
        """
        from .lifespan import state_of

        return state_of(self.worker_id)

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts

    @property
    def cancelled(self) -> bool:
        """True once the worker wants this attempt to stop (timeout, shutdown, or a cancel).

        Async jobs are cancelled at their next ``await``; sync jobs cannot be
        interrupted from outside their thread, so a long sync job should check
        this between steps and stop. After :func:`tasklet.cancel`, stop by
        raising (``raise tasklet.Cancel()``): the job ends ``cancelled``;
        a job that returns normally instead has ``succeeded``.
        """
        return self._cancel is not None and self._cancel.is_set()
