"""tasklet as one more adapter of the shared peer benchmark (../shared/bench/peers).

    BENCH_ADAPTER_FILES=tasklet=$PWD/bench/tasklet_adapter.py \\
    BENCH_ADAPTERS="raw procrastinate pgqueuer tasklet" ../shared/bench/peers/run_peers.sh

* enqueue_one: ``await noop.defer_async(t=t)``, tasklet's API for async code.
* enqueue_many: ``await noop.defer_many_async([...])``.
* worker: ``tasklet.Worker(WorkerSettings(...)).run()`` on the harness's event
  loop, in drain mode (``tasklet workoff``) or continuous (``tasklet worker``).
  ``default`` is tasklet's default settings (concurrency 100, every queue);
  ``c10`` sets concurrency 10. Every attempt writes a ``job_runs`` row.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from adapters.base import Adapter, wait_task_or_stop  # type: ignore[import-not-found]

import tasklet

#: ``TASKLET_BENCH_DEFER=sync``: the one-by-one enqueue calls ``noop.defer()`` instead.
SYNC_DEFER = os.environ.get("TASKLET_BENCH_DEFER") == "sync"


class TaskletAdapter(Adapter):  # type: ignore[misc]
    name = "tasklet"
    package = "tasklet"
    schema = "bench_tasklet"
    has_bulk = True
    drain_configs = {"default": {}, "c10": {"concurrency": 10}}  # noqa: RUF012 (harness API)
    latency_config = "default"
    done_sql = "SELECT count(*) FROM jobs WHERE status = 'succeeded'"
    queued_sql = "SELECT count(*) FROM jobs WHERE status = 'queued'"
    notes = "tasklet defaults (psycopg 3 via SQLAlchemy); defer_async; job_runs row per attempt"

    def _configure(self, dsn: str) -> None:
        tasklet.configure(dsn, schema=self.schema)

    async def install(self, dsn: str) -> None:
        self._configure(dsn)
        await asyncio.to_thread(tasklet.upgrade)

    async def open_client(self, dsn: str, workload: str) -> None:
        self._configure(dsn)

    async def close_client(self) -> None:
        tasklet.configure()

    async def enqueue_one(self, t: float) -> None:
        if SYNC_DEFER:
            noop.defer(t=t)
        else:
            await noop.defer_async(t=t)

    async def enqueue_many(self, ts: list[float]) -> None:
        await noop.defer_many_async([{"t": t} for t in ts])

    async def run_worker(
        self,
        dsn: str,
        config: dict[str, Any],
        drain: bool,
        stop: asyncio.Event,
        ready: Callable[[], None],
    ) -> None:
        self._configure(dsn)
        worker = tasklet.Worker(tasklet.WorkerSettings(**config))
        ready()
        task = asyncio.create_task(worker.run(drain=drain))
        if await wait_task_or_stop(task, stop):
            worker.stop()
            await task


ADAPTER = TaskletAdapter()


@tasklet.job(name="bench.noop")
async def noop(t: float) -> None:
    ADAPTER.sink(t)
