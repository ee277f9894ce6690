"""A long, healthy job is never rescued, even when it blocks a thread or the event loop."""

from __future__ import annotations

import time

import pytest

from tasklet import job, storage
from tasklet._database import Database
from tasklet.worker import Worker, WorkerSettings

pytestmark = pytest.mark.faults

# Heartbeat every 0.1 s, dead after 0.4 s: each job below outlives two lease periods.
SHORT_LEASE = WorkerSettings(heartbeat_s=0.1, lost_after_s=0.4, sweep_s=0.1, concurrency=4)
BLOCK_S = 1.3


def test_a_sync_job_blocking_its_thread_for_several_leases_is_not_rescued(db: Database) -> None:
    @job(name="faults.long_sync")
    def long_sync() -> str:
        time.sleep(BLOCK_S)
        return "done"

    handle = long_sync.defer()
    Worker(SHORT_LEASE).run_sync(drain=True)

    assert [(r.attempt, r.outcome) for r in storage.job_runs_list(db, handle.id)] == [
        (1, "succeeded")
    ]


def test_an_async_job_blocking_the_event_loop_is_not_rescued(db: Database) -> None:
    @job(name="faults.loop_blocker")
    async def loop_blocker() -> str:
        time.sleep(BLOCK_S)  # blocks the worker's event loop, not its heartbeat thread
        return "done"

    handle = loop_blocker.defer()
    Worker(SHORT_LEASE).run_sync(drain=True)

    assert [(r.attempt, r.outcome) for r in storage.job_runs_list(db, handle.id)] == [
        (1, "succeeded")
    ]
