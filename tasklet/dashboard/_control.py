"""The dashboard's actions on jobs and queues: the same operations as the API and the CLI."""

from __future__ import annotations

from typing import Literal

from .. import _config, _queues, _wakeup
from .._cancel import cancel_job as _cancel
from ..errors import JobNotFoundError, TaskletError
from ..storage import admin

CancelOutcome = Literal["cancelled", "cancel_requested", "not_cancellable"]

_CANCEL_OUTCOMES: dict[str, CancelOutcome] = {
    "cancelled": "cancelled",
    "requested": "cancel_requested",
    "finished": "not_cancellable",
}


def retry_job(job_id: int) -> bool:
    """A failed or cancelled job back in its queue, due now (as ``tasklet jobs retry``)."""
    db = _config.database()
    outcome = admin.jobs_retry(db, ids=(job_id,))
    if outcome.retried:
        _wakeup.publish(db.wake_key, {queue for _, queue in outcome.retried})
        return True
    reason = outcome.skipped.get(job_id, "")
    if "unique key" in reason:
        raise TaskletError(f"job {job_id} was not retried: {reason}; retry it once that one ends")
    return False


def cancel_job(job_id: int) -> CancelOutcome:
    """Cancel a queued job at once; ask a running one's worker to stop it (``tasklet.cancel``)."""
    try:
        return _CANCEL_OUTCOMES[_cancel(_config.database(), job_id)]
    except JobNotFoundError:
        return "not_cancellable"


def pause_queue(queue: str) -> None:
    _queues.pause_queue(queue)


def resume_queue(queue: str) -> None:
    _queues.resume_queue(queue)
