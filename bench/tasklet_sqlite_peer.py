"""tasklet on SQLite as one more peer of ../shared/bench/peers/sqlite_peers.py (beside huey).

    BENCH_SQLITE_PEER_FILES="tasklet-sqlite=$PWD/bench/tasklet_sqlite_peer.py" \\
        BENCH_SQLITE_PEERS="huey-sqlite tasklet-sqlite" python ../shared/bench/peers/sqlite_peers.py

* enqueue_one: ``noop.defer(t=t)``; enqueue_many: ``noop.defer_many([...])``.
* consumer: ``tasklet.Worker(WorkerSettings(...)).run_sync()`` in the consumer
  process, stopped by ``worker.stop()`` when the harness says so.
* ``default`` is tasklet's default settings (concurrency 100, every queue,
  WAL, ``synchronous=FULL``: huey's durability, each commit synced);
  ``c10`` sets concurrency 10.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

import tasklet
from tasklet import _config, storage

_sink: Callable[[float], None] = lambda t: None  # noqa: E731 (replaced in the consumer)


@tasklet.job(name="bench.sqlite.noop")
async def noop(t: float) -> None:
    _sink(t)


class TaskletSqlite:
    name = "tasklet-sqlite"
    package = "tasklet"
    has_bulk = True
    drain_configs = {"default": {}, "c10": {"concurrency": 10}}  # noqa: RUF012 (harness API)
    latency_config = "default"
    notes = "tasklet defaults: WAL, synchronous=FULL, BEGIN IMMEDIATE writes; batched claims"

    def _open(self, db: str) -> None:
        tasklet.configure(f"sqlite:///{db}")
        tasklet.upgrade()

    # producer side
    def open(self, db: str) -> None:
        self._open(db)

    def close(self) -> None:
        tasklet.configure()

    def enqueue_one(self, t: float) -> None:
        noop.defer(t=t)

    def enqueue_many(self, ts: list[float]) -> None:
        noop.defer_many([{"t": t} for t in ts])

    def queued(self) -> int:
        return storage.jobs_count(_config.database()).get("queued", 0)

    def settings(self) -> dict[str, Any]:
        with _config.database().engine.connect() as conn:
            pragma = conn.exec_driver_sql
            return {
                "sqlite": sqlite3.sqlite_version,
                "journal_mode": pragma("pragma journal_mode").scalar(),
                "synchronous": {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(
                    pragma("pragma synchronous").scalar() or 0
                ),
                "sqlalchemy": sa.__version__,
            }

    # consumer side (its own process)
    def run_consumer(
        self,
        db: str,
        config: dict[str, Any],
        sink: Callable[[float], None],
        ready: Callable[[], None],
        stop: threading.Event,
    ) -> None:
        global _sink
        _sink = sink
        self._open(db)
        worker = tasklet.Worker(tasklet.WorkerSettings(**config))

        def stopper() -> None:
            stop.wait()
            worker.stop()

        threading.Thread(target=stopper, daemon=True).start()
        ready()
        worker.run_sync()
        stop.set()


PEER = TaskletSqlite()
