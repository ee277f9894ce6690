"""Testing your jobs without a worker process: run them, run them at once, look at the queue.

>>> from tasklet.testing import assert_deferred, drain
>>> def test_signup_sends_a_welcome(client):  # doctest: +SKIP
...     client.post("/signup", json={"email": "ada@example.com"})
...     assert_deferred(send_welcome, email="ada@example.com")
...     (ran,) = drain()
...     assert ran.outcome == "succeeded"

* :func:`drain` runs every due job in this process with the real worker, on the
  configured database, and tells what ran. Retries run at once (their backoff
  is skipped); jobs deferred for later run too with ``scheduled=True``.
* :func:`eager` makes ``.defer()`` run the job at once, in the caller's
  process, through the same executor (hooks, timeouts, retries); no row is written.
* :func:`deferred_jobs` and :func:`assert_deferred` read the queued jobs back.

``pytest`` users get these as fixtures (``tasklet_database``, ``tasklet_drain``,
``tasklet_eager``) from tasklet's pytest plugin, see :mod:`tasklet.pytest_plugin`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from . import _config, _defer, _registry, hooks, storage
from ._executor import Attempt, Executor, JobTimeout
from ._job import Job
from .context import JobContext
from .storage.due import jobs_make_due
from .worker import Worker, WorkerSettings

__all__ = ["Deferred", "Ran", "assert_deferred", "deferred_jobs", "drain", "eager"]

#: Settings of the workers :func:`drain` runs: few threads, quick heartbeats, no grace.
DRAIN_SETTINGS = WorkerSettings(
    concurrency=8, heartbeat_s=0.5, lost_after_s=5.0, sweep_s=5.0, grace_s=0.0
)
_EAGER_WORKER = "tasklet-eager"
_EAGER_PENDING = "tasklet_eager_pending"
_EAGER_LISTENING = "tasklet_eager_listening"


def _session_of(connection: object) -> Session | None:
    """The ORM session whose commit an eager job waits for (async sessions have one inside)."""
    if isinstance(connection, Session):
        return connection
    inner = getattr(connection, "sync_session", None)
    return inner if isinstance(inner, Session) else None


@dataclass(frozen=True)
class Ran:
    """One attempt that :func:`drain` or :func:`eager` ran, and how it ended."""

    #: The job's row id (negative under :func:`eager`, which writes no row).
    id: int
    name: str
    #: The arguments the job was called with (without its ``JobContext``).
    args: dict[str, Any]
    attempt: int
    #: ``succeeded``, ``failed`` or ``timed_out``.
    outcome: str
    #: What the job returned (the Python object, not its stored JSON).
    result: Any = None
    #: The exception the attempt raised, with its traceback.
    error: BaseException | None = None
    #: Whether the job will be attempted again after this failure.
    will_retry: bool = False

    @property
    def succeeded(self) -> bool:
        return self.outcome == "succeeded"


@dataclass(frozen=True)
class Deferred:
    """A queued job, as :func:`deferred_jobs` reads it from the database."""

    id: int
    name: str
    args: dict[str, Any]
    queue: str
    priority: int
    run_at: dt.datetime
    attempts: int


class _Capture:
    """Records the attempts of some workers through global hooks (hooks only observe)."""

    def __init__(self, worker_ids: set[str]) -> None:
        self.worker_ids = worker_ids
        self.attempts: list[tuple[JobContext, str, Any, BaseException | None]] = []

    async def _success(self, ctx: JobContext, result: Any) -> None:
        if ctx.worker_id in self.worker_ids:
            self.attempts.append((ctx, "succeeded", result, None))

    async def _failure(self, ctx: JobContext, error: BaseException) -> None:
        if ctx.worker_id in self.worker_ids:
            outcome = "timed_out" if isinstance(error, JobTimeout) else "failed"
            self.attempts.append((ctx, outcome, None, error))

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Capture]:
        hooks.GLOBAL.after_success.append(self._success)
        hooks.GLOBAL.after_failure.append(self._failure)
        try:
            yield self
        finally:
            hooks.GLOBAL.after_success.remove(self._success)
            hooks.GLOBAL.after_failure.remove(self._failure)

    def records(self, arguments: dict[int | None, dict[str, Any]]) -> list[Ran]:
        return [
            Ran(
                id=ctx.job_id or 0,
                name=ctx.name,
                args=arguments.get(ctx.job_id, {}),
                attempt=ctx.attempt,
                outcome=outcome,
                result=result,
                error=error,
                will_retry=bool(ctx.will_retry),
            )
            for ctx, outcome, result, error in self.attempts
        ]


def _arguments(row: storage.JobRow) -> dict[str, Any]:
    job = _registry.get(row.name)
    if job is None:
        return {}
    try:
        return job.decode(row.serializer, row.args, row.args_pickle)
    except Exception:  # the attempt failed on them: its record says why
        return {}


# ------------------------------------------------------------------- drain


def drain(
    *queues: str,
    scheduled: bool = False,
    retries: bool = True,
    max_rounds: int = 100,
    settings: WorkerSettings | None = None,
) -> list[Ran]:
    """Run every due job of these queues (default: all) in this process; what ran, in order.

    A real :class:`~tasklet.Worker` claims, runs and records the jobs in the
    configured database, exactly as ``tasklet workoff`` would. A failed attempt
    that will be retried is made due at once and run again (``retries=False``
    leaves it waiting for its backoff), so a job that always fails shows all of
    its ``max_attempts``. ``scheduled=True`` also runs jobs deferred for later
    (their due time is moved to now). Jobs that jobs defer are run too.

    From inside a running event loop (an async test), the worker runs on a
    loop of its own in another thread while this call blocks.
    """
    settings = settings or DRAIN_SETTINGS
    if queues:
        settings = dataclasses.replace(settings, queues=tuple(queues))
    db = _config.database()
    names = _registry.names()
    capture = _Capture(set())
    with capture.installed():
        for round_ in range(max_rounds):
            moved = 0
            if retries or scheduled:
                moved = jobs_make_due(
                    db, queues=queues or None, names=names, retries_only=not scheduled
                )
            if round_ and not moved:
                break
            worker = Worker(settings)
            capture.worker_ids.add(worker.id)
            _run_sync(worker)
        else:
            raise RuntimeError(
                f"drain() ran {max_rounds} rounds and jobs were still due: a job keeps "
                "deferring or retrying others; raise max_rounds or stop the loop"
            )
    ids = {ctx.job_id for ctx, *_ in capture.attempts}
    rows = (storage.job_get(db, job_id) for job_id in ids if job_id is not None)
    return capture.records({row.id: _arguments(row) for row in rows if row is not None})


def _run_sync(worker: Worker) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        worker.run_sync(drain=True)
        return
    with concurrent.futures.ThreadPoolExecutor(1) as helper:
        helper.submit(worker.run_sync, drain=True).result()


# ------------------------------------------------------------------- eager


class _Eager:
    """Runs deferred jobs at once through the worker's executor, writing no row."""

    _ids = itertools.count(-1, -1)

    def __init__(self, propagate: bool) -> None:
        self.propagate = propagate
        self.capture = _Capture({_EAGER_WORKER})
        self.ran: list[Ran] = []
        self._threads = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="tasklet-eager")
        self._lock = threading.Lock()

    def close(self) -> None:
        self._threads.shutdown(wait=True)

    def run(
        self, job: Job[Any, Any], rows: list[storage.NewJob], connection: object = None
    ) -> list[_defer.JobHandle]:
        pending = self._allocate(job, rows)
        session = _session_of(connection)
        if session is not None:
            self._after_commit(session, job, pending)
        else:
            self._run_now(job, pending)
        return [_defer.JobHandle(id=job_id, name=job.name) for job_id, _ in pending]

    async def run_async(
        self, job: Job[Any, Any], rows: list[storage.NewJob], connection: object = None
    ) -> list[_defer.JobHandle]:
        pending = self._allocate(job, rows)
        session = _session_of(connection)
        if session is not None:
            self._after_commit(session, job, pending)
        else:
            await self._run_all(job, pending)
        return [_defer.JobHandle(id=job_id, name=job.name) for job_id, _ in pending]

    def _allocate(
        self, job: Job[Any, Any], rows: list[storage.NewJob]
    ) -> list[tuple[int, storage.NewJob]]:
        with self._lock:
            return [(next(self._ids), row) for row in rows]

    def _run_now(self, job: Job[Any, Any], pending: list[tuple[int, storage.NewJob]]) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            anyio.run(self._run_all, job, pending, backend="asyncio")
            return
        # defer() inside an event loop (an async view): run the jobs on a loop of their own.
        with concurrent.futures.ThreadPoolExecutor(1) as helper:
            helper.submit(anyio.run, self._run_all, job, pending).result()

    async def _run_all(self, job: Job[Any, Any], pending: list[tuple[int, storage.NewJob]]) -> None:
        for job_id, row in pending:
            await self._run_one(job, row, job_id)

    def _after_commit(
        self, session: Session, job: Job[Any, Any], pending: list[tuple[int, storage.NewJob]]
    ) -> None:
        # As a worker would first see them: once the session commits; never if it rolls back.
        if not session.info.get(_EAGER_LISTENING):
            session.info[_EAGER_LISTENING] = True
            sa_event.listen(session, "after_commit", _on_commit)
            sa_event.listen(session, "after_soft_rollback", _on_rollback)
        session.info.setdefault(_EAGER_PENDING, []).append((self, job, pending))

    async def _run_one(self, job: Job[Any, Any], row: storage.NewJob, job_id: int) -> None:
        arguments = job.decode(row.serializer, row.args, row.args_pickle)
        executor = Executor(self._threads)
        for attempt in range(1, row.max_attempts + 1):
            claimed = storage.ClaimedJob(
                id=job_id,
                name=row.name,
                queue=row.queue,
                priority=row.priority,
                serializer=row.serializer,
                args=row.args,
                args_pickle=row.args_pickle,
                attempts=attempt,
                max_attempts=row.max_attempts,
                timeout=row.timeout,
                run_at=row.run_at or storage.utcnow(),
                lease=0,
                trace_context=row.trace_context,
            )
            before = len(self.capture.attempts)
            outcome = await executor.perform(Attempt(row=claimed, job=job, worker_id=_EAGER_WORKER))
            self.ran.extend(self.capture.records({job_id: arguments})[before:])
            if outcome.step is None or not outcome.step.will_retry:
                break
        if outcome.error is not None and self.propagate:
            raise outcome.error


def _on_commit(session: Session) -> None:
    for runner, job, pending in session.info.pop(_EAGER_PENDING, []):
        runner._run_now(job, pending)


def _on_rollback(session: Session, _: object) -> None:
    if not session.in_transaction():  # the whole transaction, not a savepoint
        session.info.pop(_EAGER_PENDING, None)


@contextlib.contextmanager
def eager(*, propagate: bool = True) -> Iterator[list[Ran]]:
    """While inside, ``.defer()`` and its async forms run the job at once and return after it.

    The job runs in this process through the worker's own executor: its
    arguments go through the same encoding as a deferred job's, its hooks
    fire, its timeout applies, and a failed attempt is retried at once until
    ``max_attempts``. No row is written to ``jobs`` (handles have negative ids
    that ``get_job`` does not know). A job deferred into a ``Session``'s
    transaction (``connection=session``, sync or async) runs when the session
    commits, and not at all if it rolls back; into a ``Connection``, at once.
    With ``propagate`` (the default), the last attempt's error is raised from
    ``.defer()`` (or from the commit).

    Yields the list of attempts run so far (:class:`Ran` records).
    """
    if _defer.eager_runner is not None:
        raise RuntimeError("tasklet.testing.eager() is already active")
    runner = _Eager(propagate)
    with runner.capture.installed():
        _defer.eager_runner = runner
        try:
            yield runner.ran
        finally:
            _defer.eager_runner = None
            runner.close()


# ------------------------------------------------------------- assertions


def deferred_jobs(
    job: Job[Any, Any] | None = None, /, *, queue: str | None = None
) -> list[Deferred]:
    """The queued jobs (of this job type, of this queue), oldest first, read from the database.

    Queued includes jobs waiting for a retry or deferred for later.
    """
    rows = storage.jobs_list(_config.database(), queue=queue, status="queued")
    return [
        Deferred(
            id=row.id,
            name=row.name,
            args=_arguments(row),
            queue=row.queue,
            priority=row.priority,
            run_at=row.run_at,
            attempts=row.attempts,
        )
        for row in rows
        if job is None or row.name == job.name
    ]


def assert_deferred(
    job: Job[Any, Any], /, *args: Any, count: int | None = None, **kwargs: Any
) -> list[Deferred]:
    """Assert that a job of this type with these arguments is queued; returns the matches.

    The arguments are matched as given (``assert_deferred(send_welcome,
    user_id=5)`` matches ``send_welcome.defer(user_id=5, lang="en")``);
    ``count`` asserts how many match (``count=0``: none is queued).
    """
    try:
        wanted = dict(job.signature.bind_partial(*args, **kwargs).arguments)
    except TypeError as exc:
        raise TypeError(f"assert_deferred({job.name}): {exc}") from None
    queued = deferred_jobs(job)
    matches = [d for d in queued if all(k in d.args and d.args[k] == v for k, v in wanted.items())]
    if (count is None and not matches) or (count is not None and len(matches) != count):
        expected = "a job" if count is None else f"{count} job(s)"
        shown = "\n".join(f"  {d.id}: {d.args}" for d in queued) or "  (none)"
        raise AssertionError(
            f"expected {expected} {job.name} with arguments {wanted} to be queued; "
            f"found {len(matches)}. Queued {job.name} jobs:\n{shown}"
        )
    return matches
