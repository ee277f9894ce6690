"""One attempt of one job: decode its arguments, run hooks and the function, time it out.

No SQL here: the worker hands in a claimed row and gets back an :class:`Outcome`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from . import _codec, hooks
from ._job import Job
from .context import JobContext
from .errors import SerializationError
from .retry import Abort, Step, next_step
from .storage import JobRow, utcnow


@dataclass
class Outcome:
    """How an attempt ended: ``succeeded``, ``failed``, ``timed_out`` or ``interrupted``."""

    kind: str
    started_at: dt.datetime
    finished_at: dt.datetime
    step: Step | None = None
    result: Any = None
    error: BaseException | None = None
    #: Set when a timed-out sync job's thread finally returns: its slot is busy until then.
    thread_done: anyio.Event | None = None

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


@dataclass
class Attempt:
    """A claimed job being run: what the worker needs to interrupt and settle it."""

    row: JobRow
    job: Job[Any, Any]
    worker_id: str
    cancel: threading.Event = field(default_factory=threading.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    #: Set when a sync job's thread returns, or when the attempt is interrupted.
    wake: anyio.Event = field(default_factory=anyio.Event)
    interrupted: bool = False

    def context(self) -> JobContext:
        return JobContext(
            job_id=self.row.id,
            name=self.row.name,
            queue=self.row.queue,
            attempt=self.row.attempts,
            max_attempts=self.row.max_attempts,
            scheduled_at=self.row.run_at,
            worker_id=self.worker_id,
            _cancel=self.cancel,
        )

    def interrupt(self) -> None:
        """Stop the attempt: async jobs are cancelled, sync ones see ``ctx.cancelled``."""
        self.interrupted = True
        self.cancel.set()
        self.wake.set()
        self.scope.cancel()


class _TimedOut(Exception):
    def __init__(self, timeout: float) -> None:
        super().__init__(f"attempt ran over its timeout of {timeout:g}s")


class Executor:
    """Runs attempts; sync functions in threads started from ``task_group``.

    The task group belongs to the worker, so a timed-out sync job's thread is
    still accounted for after its attempt has been recorded.
    """

    def __init__(self, task_group: anyio.abc.TaskGroup, threads: anyio.CapacityLimiter) -> None:
        self._task_group = task_group
        self._threads = threads

    async def perform(self, attempt: Attempt) -> Outcome:
        job, row = attempt.job, attempt.row
        ctx = attempt.context()
        started = utcnow()
        thread_done: anyio.Event | None = None
        try:
            with attempt.scope:
                arguments = job.decode(row.serializer, row.args, row.args_pickle)
                if job.hooks or hooks.GLOBAL:
                    await hooks.run_before(job.hooks, ctx)
                args, kwargs = job.call_arguments(arguments, ctx)
                result = await self._call(job, args, kwargs, row.timeout, attempt)
        except _SyncTimeout as stopped:
            thread_done = stopped.done
            kind = "interrupted" if stopped.interrupted else "timed_out"
            error: BaseException = (
                _Interrupted() if stopped.interrupted else _TimedOut(stopped.seconds)
            )
        except Exception as exc:
            error, kind = exc, "failed"
        else:
            if attempt.scope.cancelled_caught:
                kind = "interrupted" if attempt.interrupted else "timed_out"
                error = _TimedOut(row.timeout or 0) if kind == "timed_out" else _Interrupted()
            else:
                outcome = Outcome(
                    "succeeded", started, utcnow(), result=_codec.encode_result(result)
                )
                if job.hooks or hooks.GLOBAL:
                    await hooks.run_after_success(job.hooks, ctx, result)
                return outcome
        return await self._failed(attempt, ctx, kind, error, started, thread_done)

    async def _failed(
        self,
        attempt: Attempt,
        ctx: JobContext,
        kind: str,
        error: BaseException,
        started: dt.datetime,
        thread_done: anyio.Event | None,
    ) -> Outcome:
        job, row = attempt.job, attempt.row
        if kind == "interrupted":
            step = Step("queued")
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
        outcome = Outcome(kind, started, utcnow(), step=step, error=error, thread_done=thread_done)
        if kind != "interrupted" and (job.hooks or hooks.GLOBAL):
            failed_ctx = dataclasses.replace(ctx, will_retry=step.will_retry)
            await hooks.run_after_failure(job.hooks, failed_ctx, error)
        return outcome

    async def _call(
        self,
        job: Job[Any, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        attempt: Attempt,
    ) -> Any:
        if job.is_async:
            # A cancel scope cancels the coroutine at its next await.
            if timeout is not None:
                attempt.scope.deadline = anyio.current_time() + timeout
            return await job.func(*args, **kwargs)
        return await self._call_sync(job.func, args, kwargs, timeout, attempt)

    async def _call_sync(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        attempt: Attempt,
    ) -> Any:
        done = anyio.Event()
        box: list[tuple[bool, Any]] = []

        def target() -> None:
            try:
                box.append((True, func(*args, **kwargs)))
            except BaseException as exc:  # handed back to the event loop below
                box.append((False, exc))

        async def in_thread() -> None:
            try:
                await anyio.to_thread.run_sync(target, limiter=self._threads)
            finally:
                done.set()
                attempt.wake.set()

        self._task_group.start_soon(in_thread)
        # A thread cannot be killed: on timeout or interruption the attempt ends
        # now, the job sees ctx.cancelled, and the thread keeps its slot until it returns.
        with anyio.CancelScope(shield=True) as waiting:
            if timeout is not None:
                waiting.deadline = anyio.current_time() + timeout
            await attempt.wake.wait()
        if not box:
            attempt.cancel.set()
            raise _SyncTimeout(done, timeout or 0.0, interrupted=attempt.interrupted)
        ok, value = box[0]
        if ok:
            return value
        raise value


class _SyncTimeout(Exception):
    def __init__(self, done: anyio.Event, seconds: float, *, interrupted: bool = False) -> None:
        super().__init__("sync job stopped waiting")
        self.done = done
        self.seconds = seconds
        self.interrupted = interrupted


class _Interrupted(Exception):
    def __init__(self) -> None:
        super().__init__("interrupted by worker shutdown; the job was put back in the queue")
