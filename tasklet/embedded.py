"""A worker inside your application's process: on its event loop, or in a thread.

The worker is the same as ``tasklet worker``'s, with the same guarantees: on a
graceful stop it takes no new job, gives running ones ``grace_s`` to finish,
and puts back in the queue (without using an attempt) what is still running.

An ASGI app (FastAPI, Starlette) runs it on its own loop for its lifetime::

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with tasklet.run_worker(tasklet.WorkerSettings(queues=("email",))):
            yield

    app = FastAPI(lifespan=lifespan)

A WSGI app (Flask) or a script runs it in a thread::

    worker = tasklet.start_in_thread()   # stopped at interpreter exit, or by worker.stop()

Async jobs run on the app's event loop (a job that blocks the loop blocks the
app too); sync jobs run in threads. Heartbeats run on a thread of their own, so
a busy app never makes its worker look dead.
"""

from __future__ import annotations

import asyncio
import atexit

# Imported now so that its exit hook (which stops every thread pool) is registered
# before ours, and so runs after ours: see _at_exit.
import concurrent.futures.thread  # noqa: F401
import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable
from types import TracebackType

from .worker import Worker, WorkerSettings, WorkerStats

__all__ = ["WorkerThread", "run_worker", "start_in_thread"]

log = logging.getLogger("tasklet.worker")

#: How long starting a worker may take (registering it in the database) before it is an error.
START_TIMEOUT_S = 30.0


@contextlib.asynccontextmanager
async def run_worker(settings: WorkerSettings | None = None) -> AsyncIterator[Worker]:
    """Run a worker on the running event loop while the ``async with`` body runs.

    Entering returns once the worker takes jobs (an error starting it, such as
    missing tables, is raised here). Leaving stops it gracefully and waits for
    it: running jobs get ``grace_s``, then go back to the queue.
    """
    worker = Worker(settings)
    task = asyncio.get_running_loop().create_task(worker.run(), name=f"tasklet-worker {worker.id}")
    try:
        await _started(worker, task)
    except BaseException:
        worker.stop(force=True)
        with contextlib.suppress(Exception):
            await task
        raise
    task.add_done_callback(_log_failure)
    try:
        yield worker
    finally:
        if task.done():  # the worker failed while the app ran: say why
            task.result()
        worker.stop()
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # The shutdown itself was cancelled: put running jobs back now rather than
            # leave them "running" until a sweep rescues them.
            worker.stop(force=True)
            await asyncio.wait([task], timeout=START_TIMEOUT_S)
            raise


def _log_failure(task: asyncio.Task[WorkerStats]) -> None:
    # Said at once: otherwise the app would run on without a worker until it stops.
    if not task.cancelled() and task.exception() is not None:
        log.error("the worker in this app stopped on an error", exc_info=task.exception())


async def _started(worker: Worker, task: asyncio.Task[WorkerStats]) -> None:
    # worker.started is a threading.Event set on this same loop: look between steps.
    deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
    while not worker.started.is_set():
        if task.done():
            task.result()  # raises the worker's error
            raise RuntimeError("the worker stopped before it started")
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"the worker did not start within {START_TIMEOUT_S:g}s")
        await asyncio.sleep(0.005)


class WorkerThread:
    """A worker running in a thread of its own; see :func:`start_in_thread`."""

    def __init__(self, settings: WorkerSettings | None = None) -> None:
        self.worker = Worker(settings)
        self.stats: WorkerStats | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"tasklet-worker {self.worker.id}", daemon=True
        )

    def _run(self) -> None:
        try:
            self.stats = self.worker.run_sync()
        except BaseException as exc:
            self._error = exc
            log.exception("the worker in thread %s stopped on an error", self._thread.name)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self, timeout: float = START_TIMEOUT_S) -> WorkerThread:
        """Start the thread; returns once the worker takes jobs (or raises why it could not)."""
        self._thread.start()
        while not self.worker.started.wait(0.01):
            if not self._thread.is_alive():
                self._raise()
                raise RuntimeError("the worker stopped before it started")
            timeout -= 0.01
            if timeout <= 0:
                self.stop(force=True)
                raise TimeoutError("the worker did not start in time")
        return self

    def stop(self, *, force: bool = False, timeout: float | None = None) -> WorkerStats | None:
        """Stop gracefully (running jobs get ``grace_s``, then go back) and wait for the thread.

        ``force`` puts running jobs back at once. Safe to call twice, and from any thread.
        """
        self.worker.stop(force=force)
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._raise()
        return self.stats

    def _raise(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def __enter__(self) -> Worker:
        if self._thread.ident is None:
            self.start()
        return self.worker

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_in_thread(
    settings: WorkerSettings | None = None, *, stop_at_exit: bool = True
) -> WorkerThread:
    """Start a worker in a background thread of this process and return it once it runs.

    With ``stop_at_exit`` the worker is stopped gracefully when the interpreter
    exits normally (end of the program, ``sys.exit``, Ctrl-C). A process killed
    by SIGTERM runs no exit handlers: have SIGTERM raise ``SystemExit`` (as
    gunicorn does) or call ``.stop()`` yourself.
    """
    thread = WorkerThread(settings).start()
    if stop_at_exit:
        _at_exit(functools.partial(_stop_quietly, thread))
    return thread


def _at_exit(callback: Callable[[], None]) -> None:
    # At exit, concurrent.futures refuses new threads before atexit handlers run, so a
    # worker still running then would fail its sync jobs ("cannot schedule new futures
    # after shutdown"). threading's own exit hooks run earlier, newest first: the
    # worker stops before the thread pools do. (It is what concurrent.futures uses.)
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is not None:
            register(callback)
            return
    except RuntimeError:  # already shutting down
        pass
    atexit.register(callback)


def _stop_quietly(thread: WorkerThread) -> None:
    try:
        thread.stop()
    except Exception:
        log.exception("the worker thread failed while stopping")
