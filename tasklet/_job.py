"""The ``@job`` decorator, job types, and deferring them."""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    Literal,
    ParamSpec,
    Protocol,
    TypeAlias,
    TypeGuard,
    TypeVar,
    overload,
)

import anyio.to_thread
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from . import _codec, _config, _registry, _wakeup, storage
from .context import JobContext
from .errors import JobDefinitionError, SerializationError
from .hooks import Hooks

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

P = ParamSpec("P")
R = TypeVar("R")
H = TypeVar("H", bound=Callable[..., Any])

Serializer = Literal["json", "pickle"]
#: Seconds to wait before the next attempt: a number, or a function of the attempt that failed.
Backoff = float | Callable[[int], float]
#: Where a job is written: the caller's connection or session joins the caller's transaction.
ConnectionLike: TypeAlias = "Connection | Session | AsyncConnection | AsyncSession"

DEFAULT_QUEUE = "default"
#: Total attempts, the first included: about a day of retries with the default backoff.
DEFAULT_MAX_ATTEMPTS = 20


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


def _check_name(kind: str, value: object) -> None:
    """Names are stored as text: non-empty, no NUL (PostgreSQL text cannot hold it)."""
    if not isinstance(value, str) or not value or "\x00" in value or len(value) > 255:
        raise ValueError(
            f"{kind} must be a non-empty string of at most 255 characters without NUL, "
            f"not {value!r}"
        )


def _check_options(options: EnqueueOptions) -> None:
    _check_name("queue", options.queue)
    if isinstance(options.priority, bool) or not isinstance(options.priority, int):
        raise ValueError(f"priority must be an int (smaller runs first), not {options.priority!r}")
    if not isinstance(options.max_attempts, int) or options.max_attempts < 1:
        raise ValueError(
            f"max_attempts counts every attempt, the first included; it must be an int >= 1, "
            f"not {options.max_attempts!r}"
        )
    if options.timeout is not None and not options.timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {options.timeout!r}")


def _is_context(annotation: Any) -> bool:
    if annotation is JobContext:
        return True
    return isinstance(annotation, str) and annotation.rsplit(".", 1)[-1] == "JobContext"


def _context_parameter(func: Callable[..., Any], signature: inspect.Signature) -> str | None:
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # unresolvable forward references: fall back to the raw annotations
        hints = {}
    for name, parameter in signature.parameters.items():
        if _is_context(hints.get(name, parameter.annotation)):
            return name
    return None


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
        _check_options(options)
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


class Job(Deferrer[P], Generic[P, R]):
    """A function registered with ``@job``: call it to run it inline, defer it to run later."""

    def __init__(
        self,
        func: Callable[..., R],
        *,
        name: str,
        options: EnqueueOptions,
        backoff: Backoff | None,
        serializer: Serializer,
        no_retry: tuple[type[BaseException], ...] = (),
    ) -> None:
        super().__init__(self, options)
        functools.update_wrapper(self, func)
        self.func = func
        self.name = name
        self.backoff = backoff
        self.no_retry = no_retry
        self.hooks = Hooks()
        self.serializer: Serializer = serializer
        self.is_async = inspect.iscoroutinefunction(func)
        signature = inspect.signature(func)
        self.context_parameter = _context_parameter(func, signature)
        self._full_signature = signature
        # Every parameter can be passed by keyword: call with **arguments directly.
        self._keywords_only = all(
            p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            for p in signature.parameters.values()
        )
        self.signature = signature.replace(
            parameters=[p for n, p in signature.parameters.items() if n != self.context_parameter]
        )
        self._accepted = frozenset(self.signature.parameters)
        self._required = frozenset(
            name for name, p in self.signature.parameters.items() if p.default is p.empty
        )

    @property
    def queue(self) -> str:
        return self._options.queue

    @property
    def priority(self) -> int:
        return self._options.priority

    @property
    def max_attempts(self) -> int:
        return self._options.max_attempts

    @property
    def timeout(self) -> float | None:
        return self._options.timeout

    def __repr__(self) -> str:
        return f"<tasklet job {self.name!r} queue={self.queue!r}>"

    # ---------------------------------------------------------------- hooks

    def before_perform(self, hook: H) -> H:
        """Register ``hook(ctx)`` to run before each attempt of this job (see tasklet.hooks)."""
        self.hooks.before_perform.append(hook)
        return hook

    def after_success(self, hook: H) -> H:
        """Register ``hook(ctx, result)`` to run after each successful attempt of this job."""
        self.hooks.after_success.append(hook)
        return hook

    def after_failure(self, hook: H) -> H:
        """Register ``hook(ctx, error)`` to run after each failed attempt (``ctx.will_retry``)."""
        self.hooks.after_failure.append(hook)
        return hook

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function inline, as if it were not decorated."""
        if self.context_parameter is None or self._has_context(args, kwargs):
            return self.func(*args, **kwargs)
        bound = self.signature.bind(*args, **kwargs)
        inline = JobContext(
            job_id=None,
            name=self.name,
            queue=self.queue,
            attempt=1,
            max_attempts=self.max_attempts,
            scheduled_at=None,
            worker_id=None,
        )
        call_args, call_kwargs = self.call_arguments(bound.arguments, inline)
        return self.func(*call_args, **call_kwargs)

    def _has_context(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
        return any(isinstance(a, JobContext) for a in (*args, *kwargs.values()))

    # ------------------------------------------------------------ arguments

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Check arguments against the signature; ``TypeError`` if they do not fit."""
        if not args and self._keywords_only:
            given = kwargs.keys()
            if self._required <= given and given <= self._accepted:
                return dict(kwargs)  # what Signature.bind would return, at a tenth of the cost
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}: {exc}") from None
        return dict(bound.arguments)

    def call_arguments(
        self, arguments: Mapping[str, Any], context: JobContext | None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Positional and keyword arguments for the function, with the context filled in."""
        if self._keywords_only:  # the common case, and the worker's hot path
            if self.context_parameter is None:
                return (), dict(arguments)
            return (), {**arguments, self.context_parameter: context}
        values = dict(arguments)
        if self.context_parameter is not None:
            values[self.context_parameter] = context
        ordered = {name: values[name] for name in self._full_signature.parameters if name in values}
        bound = inspect.BoundArguments(self._full_signature, ordered)
        return bound.args, bound.kwargs

    def encode(
        self, arguments: Mapping[str, Any]
    ) -> tuple[dict[str, Any] | None, str | None, bytes | None]:
        """The stored payload: JSON (as a dict and as text), or pickled bytes."""
        limit = _config.database().settings.max_payload_bytes
        if self.serializer == "pickle":
            return None, None, _codec.encode_pickle(arguments, limit)
        payload, text = _codec.encode_json_text(arguments, limit)
        return payload, text, None

    def decode(self, serializer: str, args: Any, args_pickle: bytes | None) -> dict[str, Any]:
        """Arguments of a stored job, refusing a payload this job did not declare."""
        if serializer == "pickle":
            if self.serializer != "pickle":
                raise SerializationError(
                    f"job {self.name!r} holds pickled arguments but is not declared with "
                    "serializer='pickle'; tasklet refuses to unpickle it"
                )
            arguments = _codec.decode_pickle(args_pickle or b"")
        elif isinstance(args, dict):
            arguments = _codec.decode_json(args)
        else:
            raise SerializationError(f"stored arguments of job {self.name!r} are not a JSON object")
        self._check_stored(arguments)
        return arguments

    def _check_stored(self, arguments: Mapping[str, Any]) -> None:
        """Stored arguments must still fit the function (a row written by hand, or by old code)."""
        given = arguments.keys()
        if self._keywords_only and self._required <= given and given <= self._accepted:
            return
        try:
            self.signature.bind_partial(**arguments)
            if self._keywords_only and not self._required <= given:
                raise TypeError(f"missing {sorted(self._required - given)}")
        except TypeError as exc:
            raise SerializationError(
                f"stored arguments {sorted(given)} do not fit {self.name}{self.signature}: {exc}"
            ) from None

    def new_row(
        self,
        options: EnqueueOptions,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        run_at: dt.datetime | None = None,
        delay_s: float = 0.0,
    ) -> storage.NewJob:
        payload, text, pickled = self.encode(self.bind(args, kwargs))
        return self._row(options, payload, text, pickled, run_at=run_at, delay_s=delay_s)

    def _row(
        self,
        options: EnqueueOptions,
        payload: dict[str, Any] | None,
        text: str | None,
        pickled: bytes | None,
        *,
        run_at: dt.datetime | None = None,
        delay_s: float = 0.0,
    ) -> storage.NewJob:
        return storage.NewJob(
            name=self.name,
            queue=options.queue,
            priority=options.priority,
            max_attempts=options.max_attempts,
            timeout=options.timeout,
            serializer=self.serializer,
            args=payload,
            args_pickle=pickled,
            run_at=run_at,
            delay_s=delay_s,
            args_json=text,
        )

    def new_rows(
        self, options: EnqueueOptions, arguments: Iterable[Mapping[str, Any]]
    ) -> list[storage.NewJob]:
        """Rows for :meth:`Deferrer.defer_many`: every mapping is checked before any is kept."""
        bound = [self.bind((), kwargs) for kwargs in arguments]
        if self.serializer == "pickle":
            return [self.new_row(options, (), kwargs) for kwargs in bound]
        limit = _config.database().settings.max_payload_bytes
        return [
            self._row(options, payload, None, None)
            for payload in _codec.encode_json_many(bound, limit)
        ]


class _JobDecorator(Protocol):
    @overload
    def __call__(self, func: Callable[typing.Concatenate[JobContext, P], R], /) -> Job[P, R]: ...
    @overload
    def __call__(self, func: Callable[P, R], /) -> Job[P, R]: ...


@overload
def job(func: Callable[typing.Concatenate[JobContext, P], R], /) -> Job[P, R]: ...
@overload
def job(func: Callable[P, R], /) -> Job[P, R]: ...
@overload
def job(
    *,
    queue: str = DEFAULT_QUEUE,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    priority: int = 0,
    name: str | None = None,
    timeout: float | None = None,
    backoff: Backoff | None = None,
    serializer: Serializer = "json",
    no_retry: tuple[type[BaseException], ...] = (),
) -> _JobDecorator: ...
def job(
    func: Callable[..., Any] | None = None,
    /,
    *,
    queue: str = DEFAULT_QUEUE,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    priority: int = 0,
    name: str | None = None,
    timeout: float | None = None,
    backoff: Backoff | None = None,
    serializer: Serializer = "json",
    no_retry: tuple[type[BaseException], ...] = (),
) -> Job[Any, Any] | _JobDecorator:
    """Register a function, sync or async, as a job type.

    >>> @job(queue="email", max_attempts=5)
    ... def send_welcome(user_id: int) -> None: ...
    >>> send_welcome.defer(user_id=5)  # doctest: +SKIP

    ``queue`` (default ``"default"``), ``max_attempts`` (every attempt, the first
    included; default 20), ``priority`` (smaller runs first; default 0),
    ``name`` (default ``module.qualname``), ``timeout`` (seconds per attempt),
    ``backoff`` (seconds between attempts, or a function of the attempt number;
    default exponential with jitter), ``serializer`` (``"json"``, or
    ``"pickle"`` for arguments JSON cannot carry), ``no_retry`` (exception
    types that fail the job at once instead of being retried).
    """
    options = EnqueueOptions(
        queue=queue, priority=priority, max_attempts=max_attempts, timeout=timeout
    )
    try:
        _check_options(options)
    except ValueError as exc:  # a bad declaration, as opposed to a bad .options() call
        raise JobDefinitionError(str(exc)) from None
    if serializer not in ("json", "pickle"):
        raise JobDefinitionError(f"serializer must be 'json' or 'pickle', not {serializer!r}")
    if (
        backoff is not None
        and not callable(backoff)
        and not (isinstance(backoff, int | float) and backoff >= 0)
    ):
        raise JobDefinitionError(
            f"backoff must be seconds (>= 0) or a function of the attempt, not {backoff!r}"
        )

    def decorate(fn: Callable[..., Any]) -> Job[Any, Any]:
        if not callable(fn):
            raise JobDefinitionError(f"@job decorates a function, not {fn!r}")
        job_name = name or _default_name(fn)
        try:
            _check_name("a job's name", job_name)
        except ValueError as exc:
            raise JobDefinitionError(str(exc)) from None
        created: Job[Any, Any] = Job(
            fn,
            name=job_name,
            options=options,
            backoff=backoff,
            serializer=serializer,
            no_retry=tuple(no_retry),
        )
        _registry.register(created)
        return created

    if func is not None:
        return decorate(func)
    return decorate


def _default_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname:
        raise JobDefinitionError(f"{fn!r} has no module and qualname: pass @job(name=...)")
    if module == "__main__":
        raise JobDefinitionError(
            f"job {qualname!r} is defined in __main__, where a worker importing your code "
            "would see it under another module name: move it into a module, or pass "
            "@job(name=...)"
        )
    return f"{module}.{qualname}"
