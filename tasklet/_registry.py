"""The job types this process knows: the only functions a worker will ever call."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .errors import JobDefinitionError

if TYPE_CHECKING:
    from ._job import Job

_lock = threading.Lock()
_jobs: dict[str, Job[Any, Any]] = {}


def _origin(job: Job[Any, Any]) -> tuple[str, int]:
    code = getattr(job.func, "__code__", None)
    return (code.co_filename, code.co_firstlineno) if code else ("", id(job.func))


def register(job: Job[Any, Any]) -> None:
    """Add a job type; a second job under the same name is an error.

    Re-running the same definition (a module reloaded) replaces the old entry.
    """
    with _lock:
        existing = _jobs.get(job.name)
        if existing is not None and _origin(existing) != _origin(job):
            raise JobDefinitionError(
                f"two jobs are named {job.name!r}: {existing.func!r} and {job.func!r}; "
                "give one of them another name with @job(name=...)"
            )
        _jobs[job.name] = job


def unregister(name: str) -> None:
    with _lock:
        _jobs.pop(name, None)


def get(name: str) -> Job[Any, Any] | None:
    return _jobs.get(name)


def names() -> list[str]:
    with _lock:
        return sorted(_jobs)


def has_limits() -> bool:
    """Whether a job type here has a concurrency limit (its worker then claims those jobs)."""
    with _lock:
        return any(job.concurrency is not None for job in _jobs.values())
