"""Reading jobs back: their current state and the record of every attempt."""

from __future__ import annotations

from . import _config, storage
from .storage import JobRow, RunRow

__all__ = ["JobRow", "RunRow", "get_job", "get_runs"]


def get_job(job_id: int) -> JobRow | None:
    """The job's row in ``jobs`` (status, attempts, last error ...), or None if it is gone.

    >>> handle = send_welcome.defer(user_id=5)  # doctest: +SKIP
    >>> tasklet.get_job(handle.id).status  # doctest: +SKIP
    'queued'
    """
    return storage.job_get(_config.database(), job_id)


def get_runs(job_id: int) -> list[RunRow]:
    """Every recorded attempt of the job, oldest first (outcome, error, traceback, result)."""
    return storage.job_runs_list(_config.database(), job_id)
