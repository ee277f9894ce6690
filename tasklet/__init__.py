"""tasklet: decorator-first background jobs on PostgreSQL or SQLite.

>>> from tasklet import job
>>> @job(queue="email", max_attempts=5)
... def send_welcome(user_id: int) -> None: ...
>>> send_welcome.defer(user_id=5)  # doctest: +SKIP
"""

from ._config import Settings, configure
from ._defer import Deferrer, JobHandle
from ._job import Job, job
from .context import JobContext
from .embedded import WorkerThread, run_worker, start_in_thread
from .errors import (
    DatabaseUnavailableError,
    JobDefinitionError,
    PayloadTooLargeError,
    SchemaMissingError,
    SerializationError,
    TaskletError,
)
from .hooks import after_failure, after_success, before_perform
from .migrations import downgrade, upgrade
from .queries import JobRow, RunRow, get_job, get_runs
from .retry import Abort, Retry
from .schema import metadata
from .worker import Worker, WorkerSettings

__all__ = [
    "Abort",
    "DatabaseUnavailableError",
    "Deferrer",
    "Job",
    "JobContext",
    "JobDefinitionError",
    "JobHandle",
    "JobRow",
    "PayloadTooLargeError",
    "Retry",
    "RunRow",
    "SchemaMissingError",
    "SerializationError",
    "Settings",
    "TaskletError",
    "Worker",
    "WorkerSettings",
    "WorkerThread",
    "after_failure",
    "after_success",
    "before_perform",
    "configure",
    "downgrade",
    "get_job",
    "get_runs",
    "job",
    "metadata",
    "run_worker",
    "start_in_thread",
    "upgrade",
]
