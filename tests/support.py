"""Helpers shared by tests that run workers in this process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tasklet.worker import Worker, WorkerSettings


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll with a deadline (the thing awaited happens in another thread or process)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)


class BackgroundWorker:
    """A worker running in a thread, as a long-lived `tasklet worker` would."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.worker = Worker(settings)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run_sync()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Worker:
        self.thread.start()
        assert self.worker.started.wait(10), "worker did not start"
        return self.worker

    def __exit__(self, *_: object) -> None:
        self.worker.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "worker did not stop"
        if self.error is not None:
            raise self.error
