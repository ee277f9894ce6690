"""Waiting for a job's result: ``handle.result()`` and ``await handle.result_async()``.

A process has one watcher thread per database, shared by every waiter in it:

* PostgreSQL: each finish batch that ends jobs sends one NOTIFY with their ids
  (see ``_PG_FINISH``); the watcher LISTENs on one connection and wakes their
  waiters at once. It also looks at every awaited job each ``poll_s``, for jobs
  that ended without a notification (rescued and failed, cancelled while
  queued) and notifications lost while it reconnected.
* SQLite has no notifications: the watcher looks at every awaited job, in one
  query, whenever the write-ahead log changed (a ``stat`` every few
  milliseconds), and otherwise polls with a backoff from 10 ms up to ``poll_s``.

A waiter reads its job once when it starts, and again only when woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from . import _codec, _config, _wakeup
from ._database import Database
from .errors import JobNotFoundError, TaskletError
from .schema import TERMINAL_STATUSES
from .storage._sql import done_channel, done_listener
from .storage.outcomes import JobOutcome, job_outcome, jobs_finished, pg_jobs_finished

if TYPE_CHECKING:
    from ._defer import JobHandle

__all__ = ["JobCancelled", "JobFailed", "handle"]

log = logging.getLogger("tasklet.results")

#: How often the watcher looks at awaited jobs without being told (the safety net).
DEFAULT_POLL_S = 1.0
_SQLITE_CHECK_S = 0.005
_FIRST_POLL_S = 0.01
#: A watcher with no waiters closes its connection after this long.
_LINGER_S = 5.0


class JobFailed(TaskletError):
    """The job failed for good (no attempts left, or not retried); carries its last error."""

    def __init__(self, job_id: int, error: str | None, traceback: str | None) -> None:
        super().__init__(f"job {job_id} failed: {error or 'no error was recorded'}")
        self.job_id = job_id
        #: ``"ExceptionType: message"`` of the final attempt.
        self.error = error
        #: The final attempt's formatted traceback, when it raised.
        self.traceback = traceback


class JobCancelled(TaskletError):
    """The job was cancelled before it could succeed."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"job {job_id} was cancelled")
        self.job_id = job_id


def _not_found(job_id: int) -> JobNotFoundError:
    return JobNotFoundError(
        f"job {job_id} is not in the jobs table: it never existed, or it finished "
        "and retention deleted it (see Retention)"
    )


def handle(job_id: int) -> JobHandle:
    """The handle of an existing job, e.g. from an id kept in your own tables.

    >>> tasklet.handle(42).result(timeout=10)  # doctest: +SKIP
    """
    from . import _defer, storage

    row = storage.job_get(_config.database(), job_id)
    if row is None:
        raise _not_found(job_id)
    return _defer.JobHandle(id=row.id, name=row.name)


def _deliver(job_id: int, outcome: JobOutcome) -> Any:
    if outcome.status == "succeeded":
        if outcome.result is None:
            return None
        # Results are stored with the arguments' codec: decode them the same way.
        return _codec.decode_json({"result": outcome.result})["result"]
    if outcome.status == "cancelled":
        raise JobCancelled(job_id)
    raise JobFailed(job_id, outcome.error, outcome.traceback)


def _check(db: Database, job_id: int) -> JobOutcome:
    outcome = job_outcome(db, job_id)
    if outcome is None:
        raise _not_found(job_id)
    return outcome


def _timed_out(job_id: int, timeout: float | None, outcome: JobOutcome) -> TimeoutError:
    return TimeoutError(f"job {job_id} did not finish within {timeout:g}s (it is {outcome.status})")


def _check_wait(timeout: float | None, poll_s: float) -> None:
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be zero or more seconds (or None), not {timeout!r}")
    if not poll_s > 0:
        raise ValueError(f"poll_s must be a positive number of seconds, not {poll_s!r}")


def wait(job_id: int, timeout: float | None = None, poll_s: float = DEFAULT_POLL_S) -> Any:
    """Block until the job is final; return its result or raise (see ``JobHandle.result``)."""
    _check_wait(timeout, poll_s)
    db = _config.database()
    deadline = None if timeout is None else time.monotonic() + timeout
    woken = threading.Event()
    watching = _Watching(db, job_id, woken.set, poll_s)
    try:
        while True:
            outcome = _check(db, job_id)
            if outcome.status in TERMINAL_STATUSES:
                return _deliver(job_id, outcome)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise _timed_out(job_id, timeout, outcome)
            woken.wait(left)
            woken.clear()
            watching.renew()
    finally:
        watching.stop()


async def wait_async(
    job_id: int, timeout: float | None = None, poll_s: float = DEFAULT_POLL_S
) -> Any:
    """:func:`wait` without blocking the event loop."""
    _check_wait(timeout, poll_s)
    db = _config.database()
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    woken = asyncio.Event()

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(woken.set)

    watching = _Watching(db, job_id, wake, poll_s)
    try:
        while True:
            outcome = await anyio.to_thread.run_sync(_check, db, job_id)
            if outcome.status in TERMINAL_STATUSES:
                return _deliver(job_id, outcome)
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise _timed_out(job_id, timeout, outcome)
            with anyio.move_on_after(left):
                await woken.wait()
            woken.clear()
            watching.renew()
    finally:
        watching.stop()


# ------------------------------------------------------------------ the shared watcher


@dataclass(eq=False)
class _Waiter:
    job_id: int
    wake: Callable[[], None]
    poll_s: float


@dataclass(eq=False)
class _Watcher:
    """The waiters of one database in this process, and the thread that wakes them."""

    db: Database
    waiters: dict[int, set[_Waiter]] = field(default_factory=dict)
    polls: Counter[float] = field(default_factory=Counter)
    kick: threading.Event = field(default_factory=threading.Event)
    #: Set once notifications are heard (PostgreSQL), or at once (SQLite).
    ready: threading.Event = field(default_factory=threading.Event)
    closing: bool = False

    def awaited(self) -> list[int]:
        with _lock:
            return list(self.waiters)

    def poll_s(self) -> float:
        with _lock:
            return min(self.polls, default=DEFAULT_POLL_S)

    def wake(self, job_ids: Any) -> None:
        with _lock:
            woken = [w for i in job_ids for w in self.waiters.get(i, ())]
        for waiter in woken:
            waiter.wake()

    def check_all(self, conn: Any = None) -> None:
        """Wake the waiters of jobs that are final; on PostgreSQL on the LISTEN connection."""
        awaited = self.awaited()
        if not awaited:
            return
        if conn is not None:
            self.wake(pg_jobs_finished(conn, self.db.schema, awaited))
            return
        try:
            finished = jobs_finished(self.db, awaited)
        except Exception as exc:  # the database is down or busy: look again at the next poll
            log.warning("could not look at awaited jobs (%s); retrying", exc)
            return
        self.wake(finished)

    def idle_too_long(self, idle_since: float) -> bool:
        """Whether to stop: no waiters for a while (then the next waiter starts a new thread)."""
        with _lock:
            if self.waiters or time.monotonic() - idle_since < _LINGER_S:
                return False
            self.closing = True
            if _watchers.get(self.db.wake_key) is self:
                del _watchers[self.db.wake_key]
            return True

    def run(self) -> None:
        try:
            if self.db.dialect == "postgresql":
                self._listen()
            else:
                self._poll_sqlite()
        except Exception:
            log.exception("result watcher stopped; its waiters start another")
            with _lock:
                self.closing = True
                if _watchers.get(self.db.wake_key) is self:
                    del _watchers[self.db.wake_key]
            self.wake(self.awaited())  # never leave a waiter without a watcher

    def _listen(self) -> None:
        import psycopg

        channel = done_channel(self.db.schema)
        idle_since = time.monotonic()
        retry_s = 0.1
        while True:
            try:
                with psycopg.connect(
                    # Finishes notify only while a connection of this name is there.
                    self.db.conninfo,
                    autocommit=True,
                    application_name=done_listener(self.db.schema),
                ) as conn:
                    conn.execute(f'LISTEN "{channel}"')
                    self.ready.set()
                    retry_s = 0.1
                    self.check_all(conn)  # whatever ended before we listened
                    next_poll = time.monotonic() + self.poll_s()
                    while True:
                        wait_s = max(0.0, min(next_poll - time.monotonic(), 0.25))
                        for notice in conn.notifies(timeout=wait_s):
                            if notice.payload:
                                self.wake(int(i) for i in notice.payload.split(","))
                            else:  # too many ids for one payload
                                self.check_all(conn)
                        if time.monotonic() >= next_poll:
                            self.check_all(conn)
                            next_poll = time.monotonic() + self.poll_s()
                        if self.awaited():
                            idle_since = time.monotonic()
                        elif self.idle_too_long(idle_since):
                            return
            except psycopg.Error as exc:
                self.ready.clear()
                log.warning("result watcher lost its connection (%s); retrying", exc)
                time.sleep(retry_s)
                retry_s = min(retry_s * 2, 5.0)
                if self.idle_too_long(idle_since):
                    return

    def _poll_sqlite(self) -> None:
        path = self.db.engine.url.database
        watcher = _wakeup.SqliteWatcher(path) if path and path != ":memory:" else None
        self.ready.set()
        idle_since = time.monotonic()
        interval = _FIRST_POLL_S
        next_poll = time.monotonic()
        while True:
            self.kick.wait(_SQLITE_CHECK_S)
            if self.kick.is_set():  # a new waiter: look again soon
                self.kick.clear()
                interval = _FIRST_POLL_S
                next_poll = min(next_poll, time.monotonic() + interval)
            changed = watcher is not None and watcher.changed()
            if changed or time.monotonic() >= next_poll:
                if changed:
                    interval = _FIRST_POLL_S
                self.check_all()
                interval = min(interval * 2, self.poll_s())
                next_poll = time.monotonic() + interval
            if self.awaited():
                idle_since = time.monotonic()
            elif self.idle_too_long(idle_since):
                return


_lock = threading.Lock()
_watchers: dict[str, _Watcher] = {}


class _Watching:
    """One waiter's registration with the watcher of its database."""

    def __init__(self, db: Database, job_id: int, wake: Callable[[], None], poll_s: float) -> None:
        self._waiter = _Waiter(job_id, wake, poll_s)
        self._db = db
        self._watcher = self._add()

    def _add(self) -> _Watcher:
        db, waiter = self._db, self._waiter
        with _lock:
            watcher = _watchers.get(db.wake_key)
            if watcher is None or watcher.closing or watcher.db is not db:
                watcher = _watchers[db.wake_key] = _Watcher(db)
                threading.Thread(target=watcher.run, name="tasklet-results", daemon=True).start()
            watcher.waiters.setdefault(waiter.job_id, set()).add(waiter)
            watcher.polls[waiter.poll_s] += 1
        watcher.kick.set()
        return watcher

    def renew(self) -> None:
        """After a wake-up: if the watcher stopped, register with a new one."""
        if self._watcher.closing:
            self.stop()
            self._watcher = self._add()

    def stop(self) -> None:
        watcher, waiter = self._watcher, self._waiter
        with _lock:
            waiters = watcher.waiters.get(waiter.job_id)
            if waiters is None or waiter not in waiters:
                return
            waiters.discard(waiter)
            if not waiters:
                del watcher.waiters[waiter.job_id]
            watcher.polls[waiter.poll_s] -= 1
            if watcher.polls[waiter.poll_s] <= 0:
                del watcher.polls[waiter.poll_s]


def watcher_ready(db: Database, timeout: float) -> bool:
    """Whether this process's watcher of ``db`` hears notifications (for tests)."""
    with _lock:
        watcher = _watchers.get(db.wake_key)
    return watcher is not None and watcher.ready.wait(timeout)
