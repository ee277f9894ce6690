"""The dashboard's actions on jobs and queues, each in one place.

MERGE NOTE: ``cancel_running_job`` is to call ``tasklet.cancel(job_id)``, and
``pause_queue``/``resume_queue`` ``tasklet.pause_queue``/``tasklet.resume_queue``,
once those land; until then they use the minimal storage operations in
``tasklet.storage.dashboard``.
"""

from __future__ import annotations

from typing import Literal

from .. import _config
from ..storage import dashboard as store

CancelOutcome = Literal["cancelled", "cancel_requested", "not_cancellable"]


def retry_job(job_id: int) -> bool:
    return store.job_retry(_config.database(), job_id)


def cancel_job(job_id: int) -> CancelOutcome:
    """Cancel a queued job at once; ask a running one's worker to stop it."""
    db = _config.database()
    if store.job_cancel_queued(db, job_id):
        return "cancelled"
    if cancel_running_job(job_id):
        return "cancel_requested"
    return "not_cancellable"


def cancel_running_job(job_id: int) -> bool:
    """Request cancellation of a running job (MERGE: becomes ``tasklet.cancel``)."""
    return store.job_request_cancel(_config.database(), job_id)


def pause_queue(queue: str) -> None:
    """MERGE: becomes ``tasklet.pause_queue``."""
    store.queue_pause(_config.database(), queue)


def resume_queue(queue: str) -> None:
    """MERGE: becomes ``tasklet.resume_queue``."""
    store.queue_resume(_config.database(), queue)
