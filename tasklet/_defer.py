"""Deferring jobs: the enqueue methods every job type has, and what they return."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeAlias, TypeGuard

import anyio.to_thread
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from . import _config, _wakeup, storage

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    from ._job import Job

P = ParamSpec("P")

#: Set by ``tasklet.testing.eager()``: runs deferred jobs at once instead of writing them.
eager_runner: EagerRunner | None = None

#: Where a job is written: the caller's connection or session joins the caller's transaction.
ConnectionLike: TypeAlias = "Connection | Session | AsyncConnection | AsyncSession"


class EagerRunner(Protocol):
    def run(
        self, job: Job[Any, Any], rows: list[storage.NewJob], connection: object
    ) -> list[JobHandle]: ...
    async def run_async(
        self, job: Job[Any, Any], rows: list[storage.NewJob], connection: object
    ) -> list[JobHandle]: ...


@dataclass(frozen=True, slots=True)
class JobHandle:
    """What ``.defer()`` returns: ``id`` is the job's row id in ``jobs``."""

    id: int
    name: str


@dataclass(frozen=True, slots=True)
class EnqueueOptions:
    """Per-enqueue settings; the decorator sets the defaults, ``.options()`` overrides them."""

    queue: str
    priority: int
    max_attempts: int
    timeout: float | None
    connection: ConnectionLike | None = None


def check_name(kind: str, value: object) -> None:
    """Names are stored as text: non-empty, no NUL (PostgreSQL text cannot hold it)."""
    if not isinstance(value, str) or not value or "\x00" in value or len(value) > 255:
        raise ValueError(
            f"{kind} must be a non-empty string of at most 255 characters without NUL, "
            f"not {value!r}"
        )


def check_options(options: EnqueueOptions) -> None:
    check_name("queue", options.queue)
    if isinstance(options.priority, bool) or not isinstance(options.priority, int):
        raise ValueError(f"priority must be an int (smaller runs first), not {options.priority!r}")
    if not isinstance(options.max_attempts, int) or options.max_attempts < 1:
        raise ValueError(
            f"max_attempts counts every attempt, the first included; it must be an int >= 1, "
            f"not {options.max_attempts!r}"
        )
    if options.timeout is not None and not options.timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {options.timeout!r}")


def _aware(when: dt.datetime) -> dt.datetime:
    if not isinstance(when, dt.datetime):
        raise TypeError(f"defer_at() takes a datetime, not {type(when).__qualname__}")
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(
            "defer_at() needs a timezone-aware datetime, because a naive one could mean "
            "any zone: pass e.g. datetime(2027, 1, 1, tzinfo=UTC)"
        )
    return when.astimezone(dt.UTC)


def _seconds(delay: dt.timedelta | float) -> float:
    seconds = delay.total_seconds() if isinstance(delay, dt.timedelta) else float(delay)
    if seconds < 0:
        raise ValueError(f"defer_in() needs a delay of zero or more, not {delay!r}")
    return seconds


def _is_async(connection: object) -> TypeGuard[AsyncConnection | AsyncSession]:
    # sqlalchemy.ext.asyncio needs greenlet: look only if the caller already loaded it.
    module = sys.modules.get("sqlalchemy.ext.asyncio")
    return module is not None and isinstance(
        connection, module.AsyncConnection | module.AsyncSession
    )


def _sync_connection(connection: Connection | Session) -> Connection:
    return connection.connection() if isinstance(connection, Session) else connection


class Deferrer(Generic[P]):
    """The enqueue methods of a job type, with one set of :class:`EnqueueOptions`."""

    def __init__(self, job: Job[P, Any], options: EnqueueOptions) -> None:
        self._job = job
        self._options = options

    def options(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        connection: ConnectionLike | None = None,
    ) -> Deferrer[P]:
        """A view of this job whose enqueues use other settings.

        ``connection`` (a SQLAlchemy ``Connection`` or ``Session``, sync or
        async) writes the job inside that transaction: it exists only if the
        transaction commits.

        >>> with Session(engine) as session, session.begin():  # doctest: +SKIP
        ...     session.add(User(id=5))
        ...     send_welcome.options(connection=session).defer(user_id=5)
        """
        current = self._options
        options = replace(
            current,
            queue=current.queue if queue is None else queue,
            priority=current.priority if priority is None else priority,
            max_attempts=current.max_attempts if max_attempts is None else max_attempts,
            timeout=current.timeout if timeout is None else timeout,
            connection=current.connection if connection is None else connection,
        )
        check_options(options)
        return Deferrer(self._job, options)

    # ------------------------------------------------------------------ sync

    def defer(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle:
        """Enqueue the job to run as soon as a worker is free; returns its handle."""
        return self._insert([self._job.new_row(self._options, args, kwargs)])[0]

    def defer_at(self, when: dt.datetime, /, *args: P.args, **kwargs: P.kwargs) -> JobHandle:
        """Enqueue the job to run at ``when`` (a timezone-aware datetime)."""
        row = self._job.new_row(self._options, args, kwargs, run_at=_aware(when))
        return self._insert([row])[0]

    def defer_in(
        self, delay: dt.timedelta | float, /, *args: P.args, **kwargs: P.kwargs
    ) -> JobHandle:
        """Enqueue the job to run after ``delay`` (a timedelta or seconds)."""
        row = self._job.new_row(self._options, args, kwargs, delay_s=_seconds(delay))
        return self._insert([row])[0]

    def defer_many(self, arguments: Iterable[Mapping[str, Any]]) -> list[JobHandle]:
        """Enqueue one job per mapping of keyword arguments, all in one round trip.

        Every mapping is checked before anything is written: one bad mapping
        inserts nothing.
        """
        return self._insert(self._job.new_rows(self._options, arguments))

    def _insert(self, rows: list[storage.NewJob]) -> list[JobHandle]:
        if eager_runner is not None:
            return eager_runner.run(self._job, rows, self._options.connection)
        db = _config.database()
        connection = self._options.connection
        if _is_async(connection):
            raise TypeError("an async connection or session needs the *_async methods")
        if connection is not None:
            conn = _sync_connection(connection)  # type: ignore[arg-type]
            ids = storage.jobs_insert(db, rows, conn)
        else:
            ids = storage.jobs_insert(db, rows, notify=_wakeup.notify_now(db.wake_key))
            # Committed: wake this process's idle workers now.
            _wakeup.publish(db.wake_key, {row.queue for row in rows})
        return [JobHandle(id=job_id, name=self._job.name) for job_id in ids]

    # ----------------------------------------------------------------- async

    async def defer_async(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle:
        """:meth:`defer` without blocking the event loop."""
        rows = [self._job.new_row(self._options, args, kwargs)]
        return (await self._insert_async(rows))[0]

    async def defer_at_async(
        self, when: dt.datetime, /, *args: P.args, **kwargs: P.kwargs
    ) -> JobHandle:
        """:meth:`defer_at` without blocking the event loop."""
        rows = [self._job.new_row(self._options, args, kwargs, run_at=_aware(when))]
        return (await self._insert_async(rows))[0]

    async def defer_in_async(
        self, delay: dt.timedelta | float, /, *args: P.args, **kwargs: P.kwargs
    ) -> JobHandle:
        """:meth:`defer_in` without blocking the event loop."""
        rows = [self._job.new_row(self._options, args, kwargs, delay_s=_seconds(delay))]
        return (await self._insert_async(rows))[0]

    async def defer_many_async(self, arguments: Iterable[Mapping[str, Any]]) -> list[JobHandle]:
        """:meth:`defer_many` without blocking the event loop."""
        return await self._insert_async(self._job.new_rows(self._options, arguments))

    async def _insert_async(self, rows: list[storage.NewJob]) -> list[JobHandle]:
        if eager_runner is not None:
            return await eager_runner.run_async(self._job, rows, self._options.connection)
        connection = self._options.connection
        if _is_async(connection):
            db = _config.database()

            def insert(sync: Connection | Session) -> list[int]:
                return storage.jobs_insert(db, rows, _sync_connection(sync))

            ids = await connection.run_sync(insert)
            return [JobHandle(id=job_id, name=self._job.name) for job_id in ids]
        if connection is not None:
            return await anyio.to_thread.run_sync(self._insert, rows)
        db = _config.database()
        ids = await storage.jobs_insert_async(db, rows, notify=_wakeup.notify_now(db.wake_key))
        _wakeup.publish(db.wake_key, {row.queue for row in rows})
        return [JobHandle(id=job_id, name=self._job.name) for job_id in ids]
