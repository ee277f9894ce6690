"""Deferring jobs: the enqueue methods every job type has, and what they return."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeAlias, TypeGuard

import anyio.to_thread
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from . import _cancel, _config, _wakeup, storage, tracing

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    from ._database import Database
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
    """What ``.defer()`` returns: ``id`` is the job's row id in ``jobs``.

    ``tasklet.handle(id)`` rebuilds the handle of an existing job.
    ``created`` is false when a unique job (``unique_key``, ``@job(unique=...)``)
    was already queued or running: the handle is that job's.
    """

    id: int
    name: str
    created: bool = True

    def result(self, timeout: float | None = None, *, poll_s: float = 1.0) -> Any:
        """Wait for the job to finish and return what it returned (decoded as arguments are).

        Raises ``tasklet.JobFailed`` (with the last error and traceback) once the
        job has failed for good, not while attempts remain; ``tasklet.JobCancelled``
        if it was cancelled; ``TimeoutError`` after ``timeout`` seconds (None:
        wait as long as it takes). On PostgreSQL a notification wakes the wait
        as the job finishes; ``poll_s`` is the safety-net poll. A return value
        JSON cannot carry was stored as null and comes back as None.
        """
        from . import results

        return results.wait(self.id, timeout, poll_s)

    async def result_async(self, timeout: float | None = None, *, poll_s: float = 1.0) -> Any:
        """:meth:`result` without blocking the event loop."""
        from . import results

        return await results.wait_async(self.id, timeout, poll_s)

    def cancel(self) -> bool:
        """Cancel this job (see :func:`tasklet.cancel`); False if it had already ended."""
        return _cancel.cancel(self.id)

    async def cancel_async(self) -> bool:
        """:meth:`cancel` without blocking the event loop."""
        return await _cancel.cancel_async(self.id)


@dataclass(frozen=True, slots=True)
class EnqueueOptions:
    """Per-enqueue settings; the decorator sets the defaults, ``.options()`` overrides them."""

    queue: str
    priority: int
    max_attempts: int
    timeout: float | None
    connection: ConnectionLike | None = None
    #: Overrides the key of a job with a concurrency limit (jobs sharing a key share it).
    concurrency_key: str | None = None
    #: While a job with this key is queued or running, deferring returns it instead.
    unique_key: str | None = None


#: Longer keys would strain the unique index; keys made from arguments are hashed instead.
MAX_UNIQUE_KEY = 1000


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
    if options.concurrency_key is not None:
        check_name("concurrency_key", options.concurrency_key)
    key = options.unique_key
    if key is not None and (
        not isinstance(key, str) or not key or "\x00" in key or len(key) > MAX_UNIQUE_KEY
    ):
        raise ValueError(
            f"unique_key must be a non-empty string of at most {MAX_UNIQUE_KEY} characters "
            f"without NUL, not {key!r}"
        )


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
        concurrency_key: str | None = None,
        unique_key: str | None = None,
    ) -> Deferrer[P]:
        """A view of this job whose enqueues use other settings.

        ``connection`` (a SQLAlchemy ``Connection`` or ``Session``, sync or
        async) writes the job inside that transaction: it exists only if the
        transaction commits.

        ``unique_key``: while a job with this key (of any job type) is queued or
        running, deferring returns that job's handle (``created=False``)
        instead of adding one. It replaces the key ``@job(unique=...)`` makes.

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
            concurrency_key=current.concurrency_key if concurrency_key is None else concurrency_key,
            unique_key=current.unique_key if unique_key is None else unique_key,
        )
        check_options(options)
        if concurrency_key is not None and self._job.concurrency is None:
            raise ValueError(
                f"concurrency_key applies to jobs with a concurrency limit: declare "
                f"{self._job.name} with @job(concurrency=N)"
            )
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

    def row_at(self, when: dt.datetime, kwargs: Mapping[str, Any]) -> storage.NewJob:
        """The row ``defer_at(when, **kwargs)`` writes (the scheduler enqueues it itself)."""
        return self._job.new_row(self._options, (), kwargs, run_at=_aware(when))

    def _unique(self) -> bool:
        return self._options.unique_key is not None or self._job.unique_by is not None

    def _insert(self, rows: list[storage.NewJob]) -> list[JobHandle]:
        if tracing.tracer is not None:
            return tracing.defer(self._job.name, self._options.queue, rows, self._write)
        return self._write(rows)

    def _write(self, rows: list[storage.NewJob]) -> list[JobHandle]:
        if eager_runner is not None:
            return eager_runner.run(self._job, rows, self._options.connection)
        db = _config.database()
        connection = self._options.connection
        if connection is not None and _is_async(connection):
            raise TypeError("an async connection or session needs the *_async methods")
        if self._unique():
            return self._insert_unique(db, rows, connection)  # type: ignore[arg-type]
        if connection is not None:
            conn = _sync_connection(connection)  # type: ignore[arg-type]
            ids = storage.jobs_insert(db, rows, conn)
            return [JobHandle(id=job_id, name=self._job.name) for job_id in ids]
        ids = storage.jobs_insert(db, rows, notify=_wakeup.notify_now(db.wake_key))
        return self._committed(db, rows, ids)

    def _committed(
        self, db: Database, rows: list[storage.NewJob], ids: list[int]
    ) -> list[JobHandle]:
        """The handles of jobs just committed, once this process's idle workers are woken."""
        name = self._job.name
        if len(rows) == 1:  # a single defer: the hot path of a web request
            _wakeup.publish(db.wake_key, (rows[0].queue,))
            return [JobHandle(id=ids[0], name=name)]
        _wakeup.publish(db.wake_key, {row.queue for row in rows})
        return [JobHandle(id=job_id, name=name) for job_id in ids]

    def _insert_unique(
        self, db: Database, rows: list[storage.NewJob], connection: Connection | Session | None
    ) -> list[JobHandle]:
        # Always NOTIFY (for the rows it adds only): a throttled enqueue that added
        # nothing would hold back the notification of the next one that does.
        if connection is not None:
            inserted = storage.jobs_insert_unique(db, rows, _sync_connection(connection))
        else:
            inserted = storage.jobs_insert_unique(db, rows)
            _publish_created(db, rows, inserted)
        return [JobHandle(id=i.id, name=i.name, created=i.created) for i in inserted]

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

    def _insert_async(self, rows: list[storage.NewJob]) -> Coroutine[Any, Any, list[JobHandle]]:
        if tracing.tracer is not None:
            job, queue = self._job.name, self._options.queue
            return tracing.defer_async(job, queue, rows, self._write_async)
        return self._write_async(rows)

    async def _write_async(self, rows: list[storage.NewJob]) -> list[JobHandle]:
        if eager_runner is not None:
            return await eager_runner.run_async(self._job, rows, self._options.connection)
        connection = self._options.connection
        if connection is not None:
            if not _is_async(connection):
                return await anyio.to_thread.run_sync(self._write, rows)
            return await self._write_on_async(connection, rows)
        db = _config.database()
        if self._unique():
            inserted = await storage.jobs_insert_unique_async(db, rows)
            _publish_created(db, rows, inserted)
            return [JobHandle(id=i.id, name=i.name, created=i.created) for i in inserted]
        ids = await storage.jobs_insert_async(db, rows, notify=_wakeup.notify_now(db.wake_key))
        return self._committed(db, rows, ids)

    async def _write_on_async(
        self, connection: AsyncConnection | AsyncSession, rows: list[storage.NewJob]
    ) -> list[JobHandle]:
        """Write into the caller's async transaction (run on its sync view, in its greenlet)."""
        db = _config.database()
        if self._unique():

            def insert_unique(sync: Connection | Session) -> list[JobHandle]:
                return self._insert_unique(db, rows, sync)

            return await connection.run_sync(insert_unique)

        def insert(sync: Connection | Session) -> list[int]:
            return storage.jobs_insert(db, rows, _sync_connection(sync))

        ids = await connection.run_sync(insert)
        return [JobHandle(id=job_id, name=self._job.name) for job_id in ids]


def _publish_created(
    db: Database, rows: list[storage.NewJob], inserted: list[storage.InsertedJob]
) -> None:
    """Wake this process's idle workers for the jobs an enqueue really added."""
    queues = {row.queue for row, job in zip(rows, inserted, strict=True) if job.created}
    if queues:
        _wakeup.publish(db.wake_key, queues)
