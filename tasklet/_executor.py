"""One attempt of one job: decode its arguments, run hooks and the function, time it out.

No SQL here: the worker hands in a claimed job and gets back an :class:`Outcome`.
This is the per-job hot path, so it creates nothing a job does not use: no
context unless the job or a hook takes one, no timer unless it has a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import datetime as dt
import threading
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from . import _codec, hooks, tracing
from ._job import Job
from .context import JobContext
from .errors import SerializationError
from .retry import Abort, Cancel, Snooze, Step, next_step
from .storage import ClaimedJob, utcnow


@dataclass(slots=True)
class Outcome:
    """How an attempt ended.

    ``succeeded``, ``failed``, ``timed_out``, ``interrupted``, ``cancelled`` or ``snoozed``.
    """

    kind: str
    started_at: dt.datetime
    finished_at: dt.datetime
    step: Step | None = None
    result: Any = None
    error: BaseException | None = None
    #: A timed-out or interrupted sync job's thread: its slot is busy until it returns.
    thread: concurrent.futures.Future[Any] | None = None

    @property
    def error_text(self) -> str | None:
        if self.error is None:
            return None
        return f"{type(self.error).__qualname__}: {self.error}"

    @property
    def traceback_text(self) -> str | None:
        if self.error is None:
            return None
        return "".join(traceback.format_exception(self.error))


@dataclass(slots=True, eq=False)
class Attempt:
    """A claimed job being run: what the worker needs to interrupt and settle it."""

    row: ClaimedJob
    job: Job[Any, Any]
    worker_id: str
    task: asyncio.Task[None] | None = None
    interrupted: bool = False
    #: Seen by the job as ``ctx.cancelled``; made only with a context.
    cancel: threading.Event | None = None
    #: Wakes the wait for a sync job's thread when the attempt is interrupted.
    stop_waiting: asyncio.Event | None = None
    #: Someone cancelled the job (see :meth:`request_cancel`).
    cancel_requested: bool = False
    #: The task has begun the attempt: before that, cancelling it would skip its settling.
    began: bool = False
    #: The function has returned or raised: what is left (after hooks) is not cancelled.
    settling: bool = False

    def context(self) -> JobContext:
        self.cancel = threading.Event()
        row = self.row
        return JobContext(
            job_id=row.id,
            name=row.name,
            queue=row.queue,
            attempt=row.attempts,
            max_attempts=row.max_attempts,
            scheduled_at=row.run_at,
            worker_id=self.worker_id,
            _cancel=self.cancel,
        )

    def request_cancel(self) -> None:
        """Cancel the job: async jobs at their next ``await``, sync ones see ``ctx.cancelled``.

        A sync job's thread is not abandoned: the attempt ends when the job
        returns (``succeeded``) or raises (``cancelled``). Called on the loop.
        """
        if self.cancel_requested:
            return
        self.cancel_requested = True
        if self.cancel is not None:
            self.cancel.set()
        if self.job.is_async and self.began and not self.settling and self.task is not None:
            self.task.cancel()

    def interrupt(self) -> None:
        """Stop the attempt: async jobs are cancelled, sync ones see ``ctx.cancelled``."""
        if self.interrupted:
            return
        self.interrupted = True
        if self.cancel is not None:
            self.cancel.set()
        if self.stop_waiting is not None:
            self.stop_waiting.set()
        elif self.task is not None and self.began:
            # A task cancelled before its first step would never settle: one that has
            # not begun sees ``interrupted`` when it does, and ends without running.
            self.task.cancel()


def _stop_error(attempt: Attempt) -> BaseException:
    """Why an attempt's task was cancelled: a cancel request, or the worker's shutdown."""
    if not attempt.cancel_requested:
        return Interrupted()
    # The cancel is caught and becomes the outcome: later awaits (hooks) must not see it.
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return Cancel("cancel requested while the job ran")


class JobTimeout(Exception):
    """An attempt ran over its job's ``timeout``."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"attempt ran over its timeout of {timeout:g}s")


class Interrupted(Exception):
    """The worker stopped before the attempt ended; the job went back to the queue."""

    def __init__(self) -> None:
        super().__init__("interrupted by worker shutdown; the job was put back in the queue")


class _ThreadStillRunning(Exception):
    def __init__(self, thread: concurrent.futures.Future[Any]) -> None:
        self.thread = thread


class Executor:
    """Runs attempts: async jobs on the running event loop, sync jobs on ``threads``."""

    def __init__(self, threads: concurrent.futures.ThreadPoolExecutor) -> None:
        self._threads = threads

    def perform(self, attempt: Attempt) -> Coroutine[Any, Any, Outcome]:
        """Run one attempt (await it); traced when tracing is on, at the cost of one check."""
        if tracing.tracer is not None:
            return tracing.run(attempt, self._perform)
        return self._perform(attempt)

    async def _perform(self, attempt: Attempt) -> Outcome:
        job, row = attempt.job, attempt.row
        with_hooks = bool(job.hooks or hooks.GLOBAL)
        ctx = attempt.context() if with_hooks or job.context_parameter else None
        started = utcnow()
        thread = None
        attempt.began = True
        try:
            if attempt.cancel_requested:  # between the claim and this task's first step
                raise Cancel("cancelled before it started")
            if attempt.interrupted:  # a shutdown between the claim and this first step
                raise asyncio.CancelledError
            arguments = job.decode(row.serializer, row.args, row.args_pickle)
            if ctx is not None and with_hooks:
                await hooks.run_before(job.hooks, ctx)
            args, kwargs = job.call_arguments(arguments, ctx)
            if job.is_async:
                result = await self._call_async(job, args, kwargs, row.timeout)
            else:
                result = await self._call_sync(job.func, args, kwargs, row.timeout, attempt)
        except asyncio.CancelledError:
            if not (attempt.cancel_requested or attempt.interrupted):
                raise
            error: BaseException = _stop_error(attempt)
            kind = "interrupted"
        except _ThreadStillRunning as still:
            thread = still.thread
            error = Interrupted() if attempt.interrupted else JobTimeout(row.timeout or 0)
            kind = "interrupted" if attempt.interrupted else "timed_out"
        except JobTimeout as exc:
            error, kind = exc, "timed_out"
        except Exception as exc:
            error, kind = exc, "failed"
        else:
            attempt.settling = True
            outcome = Outcome("succeeded", started, utcnow(), result=_codec.encode_result(result))
            if ctx is not None and with_hooks:
                await hooks.run_after_success(job.hooks, ctx, result)
            return outcome
        return await self._failed(attempt, ctx, kind, error, started, thread)

    async def _failed(
        self,
        attempt: Attempt,
        ctx: JobContext | None,
        kind: str,
        error: BaseException,
        started: dt.datetime,
        thread: concurrent.futures.Future[Any] | None,
    ) -> Outcome:
        job, row = attempt.job, attempt.row
        attempt.settling = True
        # A cancel wins over whatever the attempt did once it was asked to stop.
        if attempt.cancel_requested or isinstance(error, Cancel):
            kind, step = "cancelled", Step("cancelled")
        elif kind == "interrupted":
            step = Step("queued")
        elif isinstance(error, Snooze):
            kind, step = "snoozed", Step("queued", error.seconds)
        else:
            if isinstance(error, SerializationError):
                error = Abort(f"arguments cannot be decoded: {error}")
            step = next_step(
                error,
                attempt=row.attempts,
                max_attempts=row.max_attempts,
                backoff=job.backoff,
                no_retry=job.no_retry,
            )
        outcome = Outcome(kind, started, utcnow(), step=step, error=error, thread=thread)
        # A shutdown or a snooze is neither the job's failure nor its end: no hook.
        observed = kind not in ("interrupted", "snoozed")
        if observed and ctx is not None and (job.hooks or hooks.GLOBAL):
            failed_ctx = dataclasses.replace(ctx, will_retry=step.will_retry)
            await hooks.run_after_failure(job.hooks, failed_ctx, error)
        return outcome

    async def _call_async(
        self,
        job: Job[Any, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> Any:
        if timeout is None:
            return await job.func(*args, **kwargs)
        # Cancels the coroutine at its next await once the deadline passes.
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await job.func(*args, **kwargs)
        except TimeoutError:
            if deadline.expired():
                raise JobTimeout(timeout) from None
            raise  # the job's own TimeoutError: an ordinary failure

    async def _call_sync(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        attempt: Attempt,
    ) -> Any:
        if tracing.tracer is None:
            thread = self._threads.submit(func, *args, **kwargs)
        else:  # the job's thread runs in the attempt's context: its spans nest under the run's
            thread = self._threads.submit(contextvars.copy_context().run, func, *args, **kwargs)
        waiting = asyncio.wrap_future(thread)
        if timeout is None and attempt.task is None:
            return await waiting
        # A thread cannot be killed: on timeout or interruption the attempt ends
        # now, the job sees ctx.cancelled, and the thread keeps its slot until it returns.
        stop = attempt.stop_waiting = asyncio.Event()
        stopper = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait(
                {waiting, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopper.cancel()
        if waiting in done:
            return waiting.result()
        if attempt.cancel is not None:
            attempt.cancel.set()
        raise _ThreadStillRunning(thread)
