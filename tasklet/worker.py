"""The worker: claims due jobs, runs them, records every attempt, and stops cleanly.

One event loop (anyio on asyncio) runs one claim loop, the attempts (async
jobs on the loop, sync jobs in threads), and a flusher that writes finished
attempts in batches. A separate thread, the lifeline, heartbeats and rescues
the jobs of dead workers, so a job that blocks the loop cannot make this
worker look dead.

>>> from tasklet import Worker, WorkerSettings
>>> Worker(WorkerSettings(queues=("email",), concurrency=8)).run_sync()  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.to_thread
from sqlalchemy import exc as sa_exc

from . import _config, _registry, _scheduler, _wakeup, storage
from ._cancel import CancelWatch
from ._database import Database
from ._executor import Attempt, Executor, Outcome
from ._lifeline import Lifeline
from .errors import TaskletError
from .lifespan import worker_state
from .retention import Retention

__all__ = ["Worker", "WorkerSettings"]

log = logging.getLogger("tasklet.worker")

# What a database that is down, restarting or refusing a statement raises: the
# worker waits and tries again (it never drops a finished attempt).
_DATABASE_ERRORS = (TaskletError, sa_exc.SQLAlchemyError)


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker behaves. Every duration is in seconds."""

    #: Queues to take jobs from; empty takes every queue (unless ``queue_slots`` names some).
    queues: tuple[str, ...] = ()
    #: Queues with slots of their own (``tasklet worker -q email=4``): a flood on one
    #: cannot starve another. The other queues share ``concurrency`` slots.
    queue_slots: Mapping[str, int] = field(default_factory=dict)
    #: Attempts run at once by this process: async jobs as tasks on the event loop, sync
    #: jobs in up to this many threads. A worker claims as many jobs as it has free
    #: slots, so a larger number also means larger claims (see the README).
    concurrency: int = 100
    #: A worker whose heartbeat is older than this is dead; its jobs are rescued.
    lost_after_s: float = 30.0
    heartbeat_s: float = 5.0
    #: How often each worker looks for dead workers' jobs and unknown job names.
    sweep_s: float = 10.0
    #: A job lost with its worker this many times is failed, not retried. A job one
    #: loss away from that runs alone among such jobs: a worker runs one at a time,
    #: so a job that kills its worker cannot take another on its last chance with it.
    max_lost: int = 3
    #: Rescued jobs come back spread over this long (at most ``lost_after_s``), so the
    #: jobs one crash caught are not claimed together again with a job that crashes.
    rescue_spread_s: float = 5.0
    #: On shutdown, how long running jobs may take before they are put back.
    grace_s: float = 30.0
    #: Safety-net poll, for scheduled jobs and missed notifications.
    poll_s: float = 2.0
    #: SQLite has no notifications: how often the worker looks at the write-ahead log.
    sqlite_check_s: float = 0.005
    #: How often a worker with running jobs looks for cancel requests of them, on SQLite
    #: and in workoff. A PostgreSQL worker is notified at once, and looks on every
    #: heartbeat in case a notification was lost.
    cancel_check_s: float = 0.5
    #: While some jobs run, freed slots wait this long for others to free up, so that
    #: one claim fetches a batch (no longer than a round trip to the database).
    claim_window_s: float = 0.002
    #: Finished attempts are written together: at most this many, after at most this long.
    flush_max: int = 500
    flush_window_s: float = 0.002
    #: How long finished jobs are kept; every worker prunes older ones (see tasklet.retention).
    retention: Retention = field(default_factory=Retention)
    #: Enqueue the ticks of the recurring schedules (@periodic) of the jobs this worker knows.
    schedules: bool = True

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        for queue, slots in self.queue_slots.items():
            if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
                raise ValueError(f"queue {queue!r} needs at least 1 slot, not {slots!r}")
        if self.heartbeat_s * 3 > self.lost_after_s:
            raise ValueError(
                "heartbeat_s must be at most a third of lost_after_s, or a busy "
                "database could make a live worker look dead"
            )


class AttemptObserver(Protocol):
    """Told when this worker's attempts start and end (metrics, progress displays)."""

    def attempt_started(self, queue: str, name: str) -> None: ...

    def attempt_ended(self, queue: str, name: str, wait_s: float, outcome: Outcome) -> None: ...


@dataclass
class WorkerStats:
    """What a worker did while it ran: attempts by outcome."""

    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())


@dataclass(eq=False)
class _Lane:
    """Queues that share a number of slots, with a claim loop of their own."""

    #: None: every queue.
    queues: tuple[str, ...] | None
    concurrency: int
    in_flight: int = 0
    maybe_due: bool = True
    #: Counts wake-ups, so a claim that began before one cannot cancel it.
    wakes: int = 0
    next_due: float | None = None
    wake: anyio.Event = field(default_factory=anyio.Event)

    def takes(self, queue: str | None) -> bool:
        return queue is None or self.queues is None or queue in self.queues

    @property
    def free(self) -> int:
        return self.concurrency - self.in_flight

    @property
    def resting(self) -> bool:
        return not self.maybe_due and self.in_flight == 0

    def notify(self) -> None:
        self.wake.set()

    async def wait(self) -> None:
        await self.wake.wait()
        self.wake = anyio.Event()


def _lanes(settings: WorkerSettings) -> list[_Lane]:
    lanes = [_Lane((queue,), slots) for queue, slots in settings.queue_slots.items()]
    shared = tuple(q for q in settings.queues if q not in settings.queue_slots)
    if shared or not lanes:
        lanes.append(_Lane(shared or None, settings.concurrency))
    return lanes


class Worker:
    """Runs the jobs registered in this process. See :class:`WorkerSettings`."""

    def __init__(
        self, settings: WorkerSettings | None = None, *, database: Database | None = None
    ) -> None:
        self.settings = settings or WorkerSettings()
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stats = WorkerStats()
        self._db = database
        self._lanes = _lanes(self.settings)
        #: Every queue this worker takes, or None for all of them.
        self.queue_filter: tuple[str, ...] | None = (
            None
            if any(lane.queues is None for lane in self._lanes)
            else tuple(q for lane in self._lanes for q in lane.queues or ())
        )
        #: Attempts at once across the lanes (and job threads at most).
        self.concurrency = sum(lane.concurrency for lane in self._lanes)
        self.job_names: list[str] = []
        #: Whether some job type here has a concurrency limit (then claims take those too).
        self.limited = False
        self._limited_ids: set[int] = set()  # running jobs under a concurrency limit
        #: Jobs lost this many times are on their last chance (None: max_lost < 2).
        self._last_chance = self.settings.max_lost - 1 if self.settings.max_lost >= 2 else None
        #: The job on its last chance this worker runs, if any: it runs no second one.
        self._last_chance_id: int | None = None
        self._attempts: dict[int, Attempt] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: list[storage.Completion] = []
        self._hot_until = 0.0
        self._stopping = False
        self._force = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The LISTEN thread of a PostgreSQL worker, while it runs.
        self.listener: _wakeup.PostgresListener | None = None
        self._cancels: CancelWatch | None = None
        self._wake = anyio.Event()
        self._flushed = anyio.Event()
        self._pending_ready = anyio.Event()
        self._flush_lock = anyio.Lock()
        #: Set once the worker is registered and taking jobs.
        self.started = threading.Event()
        #: Set while the worker waits with nothing due (for tests and embedding apps).
        self.idle = threading.Event()
        #: Told when attempts start and end (see tasklet.metrics); empty costs nothing.
        self.observers: list[AttemptObserver] = []

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = _config.database()
        return self._db

    # ---------------------------------------------------------------- control

    def stop(self, *, force: bool = False) -> None:
        """Ask the worker to stop, from any thread: finish running jobs (or not, with force)."""
        loop = self._loop
        if loop is None:
            self._stopping = True
            return
        with contextlib.suppress(RuntimeError):  # the loop has already closed
            loop.call_soon_threadsafe(self._request_stop, force)

    def _request_stop(self, force: bool) -> None:
        self._stopping = True
        if force:
            self._force = True
            for attempt in self._attempts.values():
                attempt.interrupt()
        self._wake.set()
        for lane in self._lanes:
            lane.notify()

    def wake_threadsafe(self, queue: str | None) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has already closed
            loop.call_soon_threadsafe(self._on_wake, queue)

    def _on_wake(self, queue: str | None) -> None:
        for lane in self._lanes:
            if lane.takes(queue):
                lane.maybe_due = True
                lane.wakes += 1
                lane.notify()

    def _on_notify(self, queue: str | None) -> None:
        # Producers leave out notifications in bursts: stay watchful for a while.
        self._hot_until = anyio.current_time() + _wakeup.HOT_FOR_S
        self._on_wake(queue)

    def _control_threadsafe(self, message: str | None) -> None:
        """A control message (a cancel) from the listener or from this process."""
        loop, cancels = self._loop, self._cancels
        if loop is None or cancels is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has already closed
            loop.call_soon_threadsafe(cancels.on_control, message)

    def _notify_threadsafe(self, queue: str | None) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has already closed
            loop.call_soon_threadsafe(self._on_notify, queue)

    # ------------------------------------------------------------------- run

    def run_sync(self, *, drain: bool = False, handle_signals: bool = False) -> WorkerStats:
        """Run the worker on a new event loop until stopped (or, with ``drain``, until idle)."""
        return anyio.run(self._main, drain, handle_signals, backend="asyncio")

    async def _main(self, drain: bool, handle_signals: bool) -> WorkerStats:
        if not handle_signals:
            return await self.run(drain=drain)
        with _single_errors():
            async with anyio.create_task_group() as group:
                group.start_soon(self._handle_signals)
                stats = await self.run(drain=drain)
                group.cancel_scope.cancel()
        return stats

    async def _handle_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if not self._stopping:
                    log.info(
                        "%s: stopping; running jobs have %gs to finish (signal again to stop now)",
                        signal.Signals(signum).name,
                        self.settings.grace_s,
                    )
                    self._request_stop(force=False)
                else:
                    log.warning("stopping now; unfinished jobs go back to the queue")
                    self._request_stop(force=True)

    async def run(self, *, drain: bool = False) -> WorkerStats:
        """Run until :meth:`stop` (or, with ``drain``, until no job is due), then clean up.

        Jobs still running at the end of the grace period are interrupted and
        put back in the queue; nothing is lost.
        """
        self._loop = asyncio.get_running_loop()
        self.job_names = _registry.names()
        self.limited = _registry.has_limits()
        # Worker state opens before the worker registers, and closes after its last job.
        async with worker_state(self.id):
            with _frozen_heap():
                return await self._run(drain)

    async def _run(self, drain: bool) -> WorkerStats:
        db = self.db
        await anyio.to_thread.run_sync(self.register)
        lifeline = Lifeline(self)
        listener = self.listener = self._listener() if not drain else None
        self._cancels = CancelWatch(
            db,
            self.id,
            self._attempts,
            self.settings.heartbeat_s if listener is not None else self.settings.cancel_check_s,
        )
        unsubscribe = _wakeup.subscribe(db.wake_key, self.wake_threadsafe)
        unsubscribe_control = _wakeup.subscribe_control(db.wake_key, self._control_threadsafe)
        lifeline.start()
        scheduler = _scheduler.start(self) if not drain else None
        if listener is not None:
            listener.start()
        log.info(
            "worker %s started: queues %s, jobs %s",
            self.id,
            "; ".join(
                f"{', '.join(lane.queues or ('(all)',))} ({lane.concurrency} slots)"
                for lane in self._lanes
            ),
            ", ".join(self.job_names) or "(none)",
        )
        self.started.set()
        try:
            with _single_errors():
                await self._serve(drain)
        finally:
            unsubscribe()
            unsubscribe_control()
            lifeline.stop()
            if scheduler is not None:
                scheduler.stop()
            if listener is not None:
                listener.stop()
            await anyio.to_thread.run_sync(self._unregister)
            log.info("worker %s stopped: %s", self.id, dict(self.stats.outcomes) or "no jobs")
        return self.stats

    async def _serve(self, drain: bool) -> None:
        threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="tasklet-job"
        )
        executor = Executor(threads)
        claimers: list[storage.Claimer] = []
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._flush_loop)
                if self._cancels is not None:
                    group.start_soon(self._cancels.run)
                if self.db.dialect == "sqlite" and not drain:
                    group.start_soon(self._watch_sqlite)
                async with anyio.create_task_group() as lanes:
                    for lane in self._lanes:
                        claimer = storage.Claimer(
                            self.db,
                            worker_id=self.id,
                            queues=lane.queues,
                            names=self.job_names,
                            limited=self.limited,
                        )
                        claimers.append(claimer)
                        lanes.start_soon(self._claim_loop, executor, claimer, lane, drain)
                await self._wind_down()
                group.cancel_scope.cancel()
        finally:
            for claimer in claimers:
                await claimer.close_async()
            # Threads of jobs that outlived the grace period are left to finish alone.
            threads.shutdown(wait=False)

    def register(self) -> None:
        storage.worker_register(
            self.db,
            worker_id=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=self.queue_filter or (),
            concurrency=self.concurrency,
        )

    def _unregister(self) -> None:
        try:
            storage.worker_unregister(self.db, self.id)
        except _DATABASE_ERRORS as exc:
            log.warning("could not remove worker %s from the workers table: %s", self.id, exc)

    def _listener(self) -> _wakeup.PostgresListener | None:
        db = self.db
        if db.dialect != "postgresql":
            return None
        return _wakeup.PostgresListener(
            db.conninfo,
            db.notify_channel,
            self._notify_threadsafe,
            name=f"tasklet-listener {self.id}",
            control_channel=storage.control_channel(db),
            control=self._control_threadsafe,
        )

    async def _watch_sqlite(self) -> None:
        path = self.db.engine.url.database
        if not path or path == ":memory:":
            return
        watcher = _wakeup.SqliteWatcher(path)
        while True:
            await anyio.sleep(self.settings.sqlite_check_s)
            if watcher.changed():
                self._on_wake(None)

    # ------------------------------------------------------------ claim loop

    async def _claim_loop(
        self, executor: Executor, claimer: storage.Claimer, lane: _Lane, drain: bool
    ) -> None:
        # Claim in batches: when a few slots free up while others are busy, give the
        # others a moment (up to a quarter of the slots) so one round trip fetches
        # many jobs, while the rest still run; measured best of halves, quarters, eighths.
        batch = max(1, lane.concurrency // 4)
        while not self._stopping:
            if lane.free > 0 and lane.maybe_due:
                if lane.free < batch and lane.in_flight > 0:
                    await self._gather_slots(lane, batch)
                await self._claim(executor, claimer, lane, drain)
                continue
            if drain and lane.resting:
                await self._flush_all()
                if not lane.maybe_due:
                    return
                continue
            await self._idle(lane)

    async def _gather_slots(self, lane: _Lane, wanted: int) -> None:
        """Wait up to ``claim_window_s`` for ``wanted`` free slots (a batch to claim)."""
        with anyio.move_on_after(self.settings.claim_window_s):
            while lane.free < wanted and not self._stopping:
                await lane.wait()

    async def _claim(
        self, executor: Executor, claimer: storage.Claimer, lane: _Lane, drain: bool
    ) -> None:
        free, wakes = lane.free, lane.wakes
        # While a job on its last chance runs here, leave the others on theirs queued.
        lost_below = self._last_chance if self._last_chance_id is not None else None
        try:
            rows = await claimer.claim_async(free, lost_below=lost_below)
        except _DATABASE_ERRORS as exc:
            if drain:
                raise
            log.warning("could not claim jobs (%s); trying again in %gs", exc, self.settings.poll_s)
            lane.maybe_due = False
            lane.next_due = None
            return
        for row in rows:
            self._start(executor, row, lane)
        if claimer.limited:
            self._limited_ids.update(claimer.limited_ids)
        if len(rows) < free and lane.wakes == wakes:
            # Nothing more is due now: sleep until the next scheduled job, or a wake-up.
            lane.maybe_due = False
            due_in = await anyio.to_thread.run_sync(self._due_in, lane.queues, lost_below)
            if claimer.limited and claimer.retry_soon:
                # Keys held by another claimer, or not reached yet: look again in a moment.
                due_in = _wakeup.HOT_CHECK_S if due_in is None else min(due_in, _wakeup.HOT_CHECK_S)
            lane.next_due = None if due_in is None else anyio.current_time() + due_in

    def _due_in(self, queues: tuple[str, ...] | None, lost_below: int | None) -> float | None:
        """Seconds until the next queued job of these queues is due (None: none queued)."""
        due = storage.jobs_next_due(
            self.db,
            queues=queues,
            names=self.job_names,
            limited=self.limited,
            lost_below=lost_below,
        )
        return None if due is None else (due - storage.utcnow()).total_seconds()

    async def _idle(self, lane: _Lane) -> None:
        now = anyio.current_time()
        timeout = self.settings.poll_s
        if self._hot_until > now:
            timeout = min(timeout, _wakeup.HOT_CHECK_S)
        if lane.next_due is not None and not lane.maybe_due:
            timeout = max(0.0, min(timeout, lane.next_due - now))
        if all(other.resting for other in self._lanes):
            self.idle.set()
        with anyio.move_on_after(timeout) as waited:
            await lane.wait()
        self.idle.clear()
        if waited.cancelled_caught:
            lane.maybe_due = True

    # --------------------------------------------------------------- attempts

    def _start(self, executor: Executor, row: storage.ClaimedJob, lane: _Lane) -> None:
        job = _registry.get(row.name)
        if job is None:  # unregistered since the claim began: give it back untouched
            self._settle_released(row)
            return
        if self._last_chance is not None and row.lost_count >= self._last_chance:
            if self._last_chance_id is not None:
                # A second one in one claim, or in two lanes' claims at once: it goes back
                # untouched and waits for the first to end (claims leave it out till then).
                self._settle_released(row)
                return
            self._last_chance_id = row.id
        attempt = Attempt(row=row, job=job, worker_id=self.id)
        lane.in_flight += 1
        self._attempts[row.id] = attempt
        # A plain asyncio task: this is the per-job hot path, and interrupting
        # an attempt is cancelling its task.
        task = attempt.task = asyncio.get_running_loop().create_task(
            self._run_attempt(executor, attempt, lane)
        )
        self._tasks.add(task)  # removed by the task itself: a done callback costs a loop turn

    async def _run_attempt(self, executor: Executor, attempt: Attempt, lane: _Lane) -> None:
        row = attempt.row
        logging_info = log.isEnabledFor(logging.INFO)
        if logging_info:
            log.info(
                "job %d %s attempt %d/%d started", row.id, row.name, row.attempts, row.max_attempts
            )
        began = time.perf_counter()
        if self.observers:
            self._observe("attempt_started", row.queue, row.name)
        try:
            outcome = await executor.perform(attempt)
            self._attempts.pop(row.id, None)
            self._settle(attempt, outcome)
            if self.observers:
                wait_s = (outcome.started_at - row.run_at).total_seconds()
                self._observe("attempt_ended", row.queue, row.name, wait_s, outcome)
            if logging_info or outcome.kind != "succeeded":
                _log_outcome(row, outcome, time.perf_counter() - began)
            if outcome.thread is not None:
                # The attempt is over, but its thread still runs: the slot stays taken.
                with contextlib.suppress(Exception):
                    await asyncio.wrap_future(outcome.thread)
        finally:
            self._attempts.pop(row.id, None)
            if attempt.task is not None:
                self._tasks.discard(attempt.task)
            lane.in_flight -= 1
            lane.notify()
            if self._last_chance_id == row.id:  # the next job on its last chance may run
                self._last_chance_id = None
                for other in self._lanes:
                    other.maybe_due = True
                    other.notify()
            self._wake.set()

    def _observe(self, event: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, event)(*args)
            except Exception:  # an observer only watches: it must not fail the attempt
                log.exception("attempt observer %r failed on %s; ignored", observer, event)

    def _settle(self, attempt: Attempt, outcome: Outcome) -> None:
        row = attempt.row
        step = outcome.step
        self.stats.outcomes[outcome.kind] += 1
        # Neither a shutdown nor a snooze uses an attempt, and neither is an error.
        given_back = outcome.kind in ("interrupted", "snoozed")
        self._push(
            storage.Completion(
                job_id=row.id,
                lease=row.lease,
                attempt=row.attempts,
                worker_id=self.id,
                status="succeeded" if step is None else step.status,
                outcome=outcome.kind,
                started_at=outcome.started_at,
                finished_at=outcome.finished_at,
                delay_s=0.0 if step is None else step.delay_s,
                refund=given_back,
                error=None if outcome.kind == "snoozed" else outcome.error_text,
                traceback=None if given_back else outcome.traceback_text,
                result=outcome.result,
            )
        )

    def _settle_released(self, row: storage.ClaimedJob) -> None:
        """A claimed job that never started goes back without using an attempt or a run row."""
        now = storage.utcnow()
        self._push(
            storage.Completion(
                job_id=row.id,
                lease=row.lease,
                attempt=row.attempts,
                worker_id=self.id,
                status="queued",
                outcome="interrupted",
                started_at=None,
                finished_at=now,
                refund=True,
                record=False,
            )
        )

    def _push(self, completion: storage.Completion) -> None:
        self._pending.append(completion)
        self._pending_ready.set()

    # ------------------------------------------------------------- flushing

    async def _flush_loop(self) -> None:
        while True:
            await self._pending_ready.wait()
            self._pending_ready = anyio.Event()
            if len(self._pending) < self.settings.flush_max:
                # A short window lets the attempts that finish together share one write.
                await anyio.sleep(self.settings.flush_window_s)
            await self._flush_once()

    async def _flush_all(self, deadline_s: float | None = None) -> None:
        with anyio.move_on_after(deadline_s):
            while self._pending:
                await self._flush_once()
        if self._pending:
            log.error(
                "could not record %d finished attempts before stopping; their jobs will be "
                "rescued as lost and run again",
                len(self._pending),
            )

    async def _flush_once(self) -> None:
        async with self._flush_lock:
            batch = self._pending[: self.settings.flush_max]
            if not batch:
                return
            retry_s = 0.05
            while True:
                try:
                    applied = await anyio.to_thread.run_sync(storage.jobs_finish, self.db, batch)
                    break
                except _DATABASE_ERRORS as exc:
                    # Never drop a result: the job would stay "running" under a live worker.
                    log.warning(
                        "could not record finished jobs (%s); retrying in %.2fs", exc, retry_s
                    )
                    await anyio.sleep(retry_s)
                    retry_s = min(retry_s * 2, 2.0)
            del self._pending[: len(batch)]
        for completion in batch:
            if completion.job_id not in applied:
                log.warning(
                    "job %d: this worker's result (%s) was not recorded: the job was given to "
                    "another worker after this one was presumed dead (lease %d)",
                    completion.job_id,
                    completion.outcome,
                    completion.lease,
                )
            elif completion.status == "queued" and completion.delay_s <= 0:
                self._on_wake(None)
        if self._limited_ids:
            self._limited_finished(batch)
        if self._pending:
            self._pending_ready.set()

    def _limited_finished(self, batch: list[storage.Completion]) -> None:
        """A recorded end of a job under a concurrency limit frees room in its key: claim."""
        freed = [c.job_id for c in batch if c.job_id in self._limited_ids]
        if freed:
            self._limited_ids.difference_update(freed)
            self._on_wake(None)

    # --------------------------------------------------------------- shutdown

    async def _wind_down(self) -> None:
        """Let running jobs finish within the grace period, then put the rest back."""
        grace = 0.0 if self._force else self.settings.grace_s
        with anyio.move_on_after(grace):
            while self._attempts:
                await self._wake.wait()
                self._wake = anyio.Event()
        for attempt in list(self._attempts.values()):
            attempt.interrupt()
        with anyio.move_on_after(max(1.0, self.settings.grace_s)):
            while self._attempts:
                await self._wake.wait()
                self._wake = anyio.Event()
        await self._flush_all(deadline_s=30.0)
        for task in list(self._tasks):  # only tasks waiting for a stuck thread remain
            task.cancel()


_frozen_by = 0  # workers running in this process (all on event loops of its threads)
_workers_started = False  # whether a worker has run in this process before
_frozen_lock = threading.Lock()


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Keep the objects alive when the first worker starts out of the garbage collector.

    Every attempt allocates, so the collector runs often, and each full pass walked
    the whole heap (SQLAlchemy, the app): 8% of a drain of short jobs. Those
    objects are the process's long-lived ones. When the last worker stops they go
    back, so anything among them that has become garbage is still collected.
    """
    global _frozen_by, _workers_started
    with _frozen_lock:
        _frozen_by += 1
        if _frozen_by == 1:
            # Garbage is collected first, not frozen with the rest. An earlier worker
            # of this process that has stopped sits in the oldest generation, where
            # only a full pass finds it (and the connections it held); the first
            # worker has none, and spares the process that pass over its whole heap.
            gc.collect(2 if _workers_started else 1)
            _workers_started = True
            gc.freeze()
    try:
        yield
    finally:
        with _frozen_lock:
            _frozen_by -= 1
            if _frozen_by == 0:
                gc.unfreeze()


@contextlib.contextmanager
def _single_errors() -> Iterator[None]:
    """Raise a task group's only error as itself, so callers can catch TaskletError."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            yield from _leaves(error)
        else:
            yield error


def _log_outcome(row: storage.ClaimedJob, outcome: Outcome, seconds: float) -> None:
    step = outcome.step
    if outcome.kind == "succeeded":
        log.info("job %d %s attempt %d succeeded in %.3fs", row.id, row.name, row.attempts, seconds)
    elif outcome.kind == "interrupted":
        log.info(
            "job %d %s attempt %d interrupted; back in the queue", row.id, row.name, row.attempts
        )
    elif outcome.kind == "snoozed" and step is not None:
        log.info("job %d %s snoozed; back in %.1fs", row.id, row.name, step.delay_s)
    elif outcome.kind == "cancelled":
        log.info("job %d %s cancelled in attempt %d", row.id, row.name, row.attempts)
    else:
        retry = step is not None and step.will_retry
        log.log(
            logging.WARNING if retry else logging.ERROR,
            "job %d %s attempt %d/%d %s in %.3fs: %s; %s",
            row.id,
            row.name,
            row.attempts,
            row.max_attempts,
            outcome.kind.replace("_", " "),
            seconds,
            outcome.error_text,
            f"retry in {step.delay_s:.1f}s" if retry and step else "no retry",
            exc_info=None if retry else outcome.error,
        )
