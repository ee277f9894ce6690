"""The worker's lifeline: heartbeats, and sweeps for dead workers' jobs and unknown jobs.

It runs on a thread of its own, with its own connections, so that a job that
blocks the event loop (or every job thread) cannot make its worker look dead.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from . import storage
from .retention import Pruner

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("tasklet.worker")


def _unknown_job_message(name: str) -> str:
    module = name.rpartition(".")[0] or name
    return (
        f"no running worker knows the job {name!r}: add the module that defines it "
        f"(probably {module!r}) to [tool.tasklet] imports in pyproject.toml, to "
        "TASKLET_IMPORTS, or pass `tasklet worker --import MODULE`"
    )


class Lifeline(threading.Thread):
    """Heartbeats, and sweeps for dead workers' jobs, on its own thread and connection."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(name="tasklet-lifeline", daemon=True)
        self._worker = worker
        self._stop_event = threading.Event()
        retention = worker.settings.retention
        #: Retention has a thread of its own, so that it never delays a heartbeat.
        self.pruner = None if retention.every is None else Pruner(worker.db, retention)

    def start(self) -> None:
        super().start()
        if self.pruner is not None:
            self.pruner.start()

    def stop(self) -> None:
        self._stop_event.set()
        if self.pruner is not None:
            self.pruner.stop()
        # Both stop between statements: wait for that, so none outlives the worker.
        if self.pruner is not None and self.pruner.is_alive():
            self.pruner.join(timeout=5.0)
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2.0)

    def run(self) -> None:
        settings = self._worker.settings
        next_sweep = 0.0
        while not self._stop_event.is_set():
            self._beat()
            if time.monotonic() >= next_sweep:
                self._sweep()
                next_sweep = time.monotonic() + settings.sweep_s
            self._stop_event.wait(min(settings.heartbeat_s, settings.sweep_s))

    def _beat(self) -> None:
        worker = self._worker
        try:
            if not storage.worker_heartbeat(worker.db, worker.id):
                log.warning(
                    "worker %s was presumed dead by another worker; registering again "
                    "(results of jobs it lost will not be recorded)",
                    worker.id,
                )
                worker.register()
        except Exception as exc:
            log.warning("heartbeat failed: %s", exc)

    def _sweep(self) -> None:
        worker = self._worker
        settings = worker.settings
        try:
            lost = storage.jobs_rescue(
                worker.db,
                lost_after_s=settings.lost_after_s,
                max_lost=settings.max_lost,
                spread_s=min(settings.rescue_spread_s, settings.lost_after_s),
            )
            for row in lost:
                log.warning(
                    "job %d %s attempt %d was lost with worker %s; rescued",
                    row.id,
                    row.name,
                    row.attempts,
                    row.locked_by,
                )
            if lost:
                worker.wake_threadsafe(None)
            flagged = storage.jobs_flag_unknown(
                worker.db,
                queues=worker.queue_filter,
                known=worker.job_names,
                message=_unknown_job_message,
            )
            for name in flagged:
                log.warning("%s", _unknown_job_message(name))
        except Exception as exc:
            log.warning("sweep failed: %s", exc)
