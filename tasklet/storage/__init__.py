"""Every SQL statement tasklet runs, as named operations (noun_verb) on a :class:`Database`.

The worker, the CLI and the public API call these and never build SQL of their
own. Dialect differences stay inside this package. Each operation is written
once, synchronously; async callers run it in a worker thread.

* ``jobs``: enqueue, read, clear, count (the API and the CLI);
* ``attempts``: claim, finish, rescue (the worker);
* ``queues``: pause, resume, list;
* ``unique``: enqueue jobs with unique keys;
* ``schedules``: the ticks of recurring schedules;
* ``workers``: register, heartbeat, unregister.
* ``workers``: register, heartbeat, unregister;
* ``control``: cancel, and the cancel requests a worker must act on.
"""

from .attempts import Claimer, jobs_claim, jobs_finish, jobs_rescue
from .control import (
    CANCEL_PREFIX,
    CancelResult,
    cancel_payload,
    control_channel,
    job_cancel,
    jobs_cancel_requested,
)
from .jobs import (
    job_get,
    job_runs_list,
    jobs_clear,
    jobs_count,
    jobs_flag_unknown,
    jobs_insert,
    jobs_insert_async,
    jobs_list,
    jobs_next_due,
)
from .queues import QueueRow, queue_pause, queue_resume, queues_list, queues_paused
from .rows import ClaimedJob, Completion, JobRow, NewJob, NewJobBatch, RunRow, as_utc, utcnow
from .schedules import schedule_last_ticks, schedule_tick_insert, schedule_ticks_prune
from .stats import queue_depths
from .unique import InsertedJob, jobs_insert_unique, jobs_insert_unique_async
from .workers import worker_heartbeat, worker_register, worker_unregister

__all__ = [
    "CANCEL_PREFIX",
    "CancelResult",
    "ClaimedJob",
    "Claimer",
    "Completion",
    "InsertedJob",
    "JobRow",
    "NewJob",
    "NewJobBatch",
    "QueueRow",
    "RunRow",
    "as_utc",
    "cancel_payload",
    "control_channel",
    "job_cancel",
    "job_get",
    "job_runs_list",
    "jobs_cancel_requested",
    "jobs_claim",
    "jobs_clear",
    "jobs_count",
    "jobs_finish",
    "jobs_flag_unknown",
    "jobs_insert",
    "jobs_insert_async",
    "jobs_insert_unique",
    "jobs_insert_unique_async",
    "jobs_list",
    "jobs_next_due",
    "jobs_rescue",
    "queue_depths",
    "queue_pause",
    "queue_resume",
    "queues_list",
    "queues_paused",
    "schedule_last_ticks",
    "schedule_tick_insert",
    "schedule_ticks_prune",
    "utcnow",
    "worker_heartbeat",
    "worker_register",
    "worker_unregister",
]
