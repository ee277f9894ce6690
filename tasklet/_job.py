"""The ``@job`` decorator and job types (deferring them is ``_defer.Deferrer``)."""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import typing
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    Literal,
    ParamSpec,
    Protocol,
    TypeVar,
    overload,
)

from . import _codec, _config, _registry, _unique, storage
from ._defer import Deferrer, EnqueueOptions, check_name, check_options
from .context import JobContext
from .errors import JobDefinitionError, SerializationError
from .hooks import Hooks

if TYPE_CHECKING:
    pass

P = ParamSpec("P")
R = TypeVar("R")
H = TypeVar("H", bound=Callable[..., Any])

Serializer = Literal["json", "pickle"]
#: Seconds to wait before the next attempt: a number, or a function of the attempt that failed.
Backoff = float | Callable[[int], float]

DEFAULT_QUEUE = "default"
#: Total attempts, the first included: about nine hours of retries with the default backoff.
DEFAULT_MAX_ATTEMPTS = 20


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
        concurrency: int | None = None,
        concurrency_key: str | None = None,
        unique: bool | str | Sequence[str] = False,
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
        #: At most this many attempts of this job (per key) run at once, across all workers.
        self.concurrency = concurrency
        #: The parameter whose value divides the limit into keys, if any.
        self.concurrency_key = concurrency_key
        if concurrency_key is not None and concurrency_key not in self._accepted:
            raise JobDefinitionError(
                f"concurrency_key={concurrency_key!r} must name a parameter of "
                f"{self.name}{self.signature}"
            )
        #: The arguments whose values make the unique key of each enqueue (None: not unique).
        self.unique_by = _unique.arguments(self.name, self.signature, unique)

    def unique_key_for(self, arguments: Mapping[str, Any]) -> str:
        """The key ``@job(unique=...)`` gives these bound arguments (see tasklet._unique)."""
        assert self.unique_by is not None
        return _unique.key_for(self.name, self.signature, self.unique_by, arguments)

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
            if args_pickle is None:
                raise SerializationError(f"job {self.name!r} is pickled but holds no bytes")
            arguments = _codec.decode_pickle(args_pickle)
        elif serializer != "json":
            # PostgreSQL has no CHECK on this column (see schema.py): a row written by hand.
            raise SerializationError(
                f"job {self.name!r} names serializer {serializer!r}; tasklet knows 'json' "
                "and 'pickle'"
            )
        else:
            # JSON text from the database, or a dict from tasklet.testing.
            decoded: Any = None
            if isinstance(args, str):
                decoded = _codec.decode_json_text(args)
            elif isinstance(args, dict):
                decoded = _codec.decode_json(args)
            if not isinstance(decoded, dict):
                raise SerializationError(
                    f"stored arguments of job {self.name!r} are not a JSON object"
                )
            arguments = decoded
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

    def _limit(
        self, options: EnqueueOptions, arguments: Mapping[str, Any]
    ) -> tuple[str | None, int | None]:
        """The concurrency key and limit a new row carries (none for an unlimited job)."""
        if self.concurrency is None:
            return None, None
        if options.concurrency_key is not None:
            return options.concurrency_key, self.concurrency
        if self.concurrency_key is None:
            return self.name, self.concurrency
        parameter = self.signature.parameters[self.concurrency_key]
        value = arguments.get(self.concurrency_key, parameter.default)
        if isinstance(value, bool) or not isinstance(value, str | int | uuid.UUID):
            raise TypeError(
                f"{self.name}: {self.concurrency_key}={value!r} is its concurrency key, which "
                "must be a str, an int or a UUID (or pass .options(concurrency_key=...))"
            )
        key = f"{self.name}:{value}"
        if "\x00" in key:
            raise ValueError(f"{self.name}: a concurrency key cannot hold NUL, as in {key!r}")
        return key, self.concurrency

    def new_row(
        self,
        options: EnqueueOptions,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        run_at: dt.datetime | None = None,
        delay_s: float = 0.0,
    ) -> storage.NewJob:
        arguments = self.bind(args, kwargs)
        payload, text, pickled = self.encode(arguments)
        key = options.unique_key
        if key is None and self.unique_by is not None:
            key = self.unique_key_for(arguments)
        return self._row(
            options,
            payload,
            text,
            pickled,
            run_at=run_at,
            delay_s=delay_s,
            limit=self._limit(options, arguments),
            unique_key=key,
        )

    def _row(
        self,
        options: EnqueueOptions,
        payload: dict[str, Any] | None,
        text: str | None,
        pickled: bytes | None,
        *,
        run_at: dt.datetime | None = None,
        delay_s: float = 0.0,
        limit: tuple[str | None, int | None] = (None, None),
        unique_key: str | None = None,
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
            concurrency_key=limit[0],
            concurrency_limit=limit[1],
            unique_key=unique_key,
        )

    def new_rows(
        self, options: EnqueueOptions, arguments: Iterable[Mapping[str, Any]]
    ) -> list[storage.NewJob]:
        """Rows for :meth:`Deferrer.defer_many`: every mapping is checked before any is kept."""
        bound = [self.bind((), kwargs) for kwargs in arguments]
        if self.serializer == "pickle" or self.unique_by is not None:
            return [self.new_row(options, (), kwargs) for kwargs in bound]
        payloads, array = _codec.encode_json_many(
            bound, _config.database().settings.max_payload_bytes
        )
        key = options.unique_key
        rows = [
            self._row(
                options, payload, None, None, limit=self._limit(options, kwargs), unique_key=key
            )
            for payload, kwargs in zip(payloads, bound, strict=True)
        ]
        if self.concurrency_key is not None:  # each row's arguments choose its limit's key
            return rows
        return storage.NewJobBatch(rows, array)


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
    concurrency: int | None = None,
    concurrency_key: str | None = None,
    unique: bool | str | Sequence[str] = False,
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
    concurrency: int | None = None,
    concurrency_key: str | None = None,
    unique: bool | str | Sequence[str] = False,
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
    types that fail the job at once instead of being retried), ``concurrency``
    (at most this many attempts run at once across every worker and machine),
    ``concurrency_key`` (the name of a parameter: the limit then applies per
    value of that argument, e.g. per tenant).
    types that fail the job at once instead of being retried), ``unique``
    (``True`` or names of arguments: while a job with the same values is
    queued or running, deferring returns it instead of adding one).
    """
    options = EnqueueOptions(
        queue=queue, priority=priority, max_attempts=max_attempts, timeout=timeout
    )
    try:
        check_options(options)
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

    _check_concurrency(concurrency, concurrency_key)

    def decorate(fn: Callable[..., Any]) -> Job[Any, Any]:
        if not callable(fn):
            raise JobDefinitionError(f"@job decorates a function, not {fn!r}")
        job_name = name or _default_name(fn)
        try:
            check_name("a job's name", job_name)
        except ValueError as exc:
            raise JobDefinitionError(str(exc)) from None
        created: Job[Any, Any] = Job(
            fn,
            name=job_name,
            options=options,
            backoff=backoff,
            serializer=serializer,
            no_retry=tuple(no_retry),
            concurrency=concurrency,
            concurrency_key=concurrency_key,
            unique=unique,
        )
        _registry.register(created)
        return created

    if func is not None:
        return decorate(func)
    return decorate


def _check_concurrency(concurrency: int | None, concurrency_key: str | None) -> None:
    if concurrency is not None and (
        isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
    ):
        raise JobDefinitionError(
            f"concurrency is how many attempts may run at once: an int >= 1, not {concurrency!r}"
        )
    if concurrency_key is not None:
        if concurrency is None:
            raise JobDefinitionError(
                "concurrency_key divides a concurrency limit by argument: pass concurrency=N too"
            )
        if not isinstance(concurrency_key, str):
            raise JobDefinitionError(
                f"concurrency_key names a parameter of the job, not {concurrency_key!r}"
            )


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
