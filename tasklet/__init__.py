"""tasklet: decorator-first background jobs on PostgreSQL or SQLite.

>>> from tasklet import job
>>> @job(queue="email", max_attempts=5)
... def send_welcome(user_id: int) -> None: ...
>>> send_welcome.defer(user_id=5)  # doctest: +SKIP
"""

from ._cancel import cancel, cancel_async
from ._config import Settings, configure
from ._defer import Deferrer, JobHandle
from ._job import Job, job
from ._queues import pause_queue, paused_queues, resume_queue
from .context import JobContext
from .embedded import WorkerThread, run_worker, start_in_thread
from .errors import (
    DatabaseUnavailableError,
    JobDefinitionError,
    JobNotFoundError,
    PayloadTooLargeError,
    SchemaMissingError,
    SerializationError,
    TaskletError,
)
from .hooks import after_failure, after_success, before_perform
from .lifespan import WorkerStartupError, worker_lifespan
from .migrations import downgrade, upgrade
from .queries import JobRow, RunRow, get_job, get_runs
from .results import JobCancelled, JobFailed, handle
from .retention import Retention, prune, prune_async
from .retry import Abort, Cancel, Retry, Snooze
from .schedules import Schedule, periodic
from .schema import metadata
from .worker import Worker, WorkerSettings

__all__ = [
    "Abort",
    "Cancel",
    "DatabaseUnavailableError",
    "Deferrer",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobDefinitionError",
    "JobFailed",
    "JobHandle",
    "JobNotFoundError",
    "JobRow",
    "PayloadTooLargeError",
    "Retention",
    "Retry",
    "RunRow",
    "Schedule",
    "SchemaMissingError",
    "SerializationError",
    "Settings",
    "Snooze",
    "TaskletError",
    "Worker",
    "WorkerSettings",
    "WorkerStartupError",
    "WorkerThread",
    "after_failure",
    "after_success",
    "before_perform",
    "cancel",
    "cancel_async",
    "configure",
    "downgrade",
    "get_job",
    "get_runs",
    "handle",
    "job",
    "metadata",
    "pause_queue",
    "paused_queues",
    "periodic",
    "prune",
    "prune_async",
    "resume_queue",
    "run_worker",
    "start_in_thread",
    "upgrade",
    "worker_lifespan",
]
