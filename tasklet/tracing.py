"""OpenTelemetry tracing from ``.defer()`` to the run: ``tasklet.tracing.instrument()``.

Once instrumented, every defer is a PRODUCER span ``tasklet.defer <job name>``
whose W3C trace context (``traceparent``, ``tracestate``, through the global
propagator) is stored with the job, and every attempt is a CONSUMER span
``tasklet.run <job name>``. Following the OpenTelemetry messaging conventions
for a span that processes one message, the run's parent is the stored context
and it also links to it (the link is what the conventions require; the parent
keeps the defer and its runs in one trace). The run span is the current span
while the job and its hooks run, in the job's task (async) or thread (sync),
so the job's own spans nest under it.

Off until :func:`instrument` is called: while off, a defer and an attempt pay
one attribute check, and nothing is stored. Tracing is per process: instrument
both the processes that defer and the workers.

Needs the ``otel`` extra: ``pip install 'tasklet[otel]'``.

>>> import tasklet.tracing
>>> tasklet.tracing.instrument()  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .errors import TaskletError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from ._defer import JobHandle
    from ._executor import Attempt, Outcome
    from .storage import NewJob

__all__ = ["instrument", "is_instrumented", "uninstrument"]

#: The tracer while tracing is on. ``None`` (off) is all the hot paths look at.
tracer: Tracer | None = None

_SYSTEM = "tasklet"
#: Outcomes that are the job's failure: the span's status is ERROR.
_ERRORS = frozenset({"failed", "timed_out"})


def instrument(tracer_provider: TracerProvider | None = None) -> None:
    """Trace defers and attempts in this process, with ``tracer_provider`` or the global one.

    Raises :class:`tasklet.TaskletError` when OpenTelemetry is not installed.
    Calling it again replaces the tracer (e.g. with another provider).
    """
    global tracer
    try:
        from opentelemetry import trace
    except ImportError as error:
        raise TaskletError(
            "tracing needs the OpenTelemetry API: pip install 'tasklet[otel]'"
        ) from error
    tracer = trace.get_tracer("tasklet", _version(), tracer_provider=tracer_provider)


def _version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("tasklet")
    except metadata.PackageNotFoundError:  # run from a source tree
        return None


def uninstrument() -> None:
    """Stop tracing: later defers store no context and attempts make no span."""
    global tracer
    tracer = None


def is_instrumented() -> bool:
    """Whether :func:`instrument` is in effect."""
    return tracer is not None


# ------------------------------------------------------------------ defer


def defer(
    name: str,
    queue: str,
    rows: list[NewJob],
    write: Callable[[list[NewJob]], list[JobHandle]],
) -> list[JobHandle]:
    """``write(rows)`` inside a defer span, the rows carrying its trace context."""
    with _defer_span(name, queue, len(rows)) as span:
        handles = write(_carrying_context(rows))
        _name_jobs(span, handles)
        return handles


async def defer_async(
    name: str,
    queue: str,
    rows: list[NewJob],
    write: Callable[[list[NewJob]], Awaitable[list[JobHandle]]],
) -> list[JobHandle]:
    """:func:`defer` for async writers."""
    with _defer_span(name, queue, len(rows)) as span:
        handles = await write(_carrying_context(rows))
        _name_jobs(span, handles)
        return handles


def _defer_span(name: str, queue: str, count: int) -> Any:
    from opentelemetry.trace import SpanKind

    assert tracer is not None
    attributes: dict[str, Any] = {
        "messaging.system": _SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": "defer",
        "messaging.destination.name": queue,
        "tasklet.job.name": name,
    }
    if count != 1:
        attributes["messaging.batch.message_count"] = count
    return tracer.start_as_current_span(
        f"tasklet.defer {name}", kind=SpanKind.PRODUCER, attributes=attributes
    )


def _carrying_context(rows: list[NewJob]) -> list[NewJob]:
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:  # no valid span (e.g. no SDK): nothing worth storing
        return rows
    text = json.dumps(carrier, separators=(",", ":"), sort_keys=True)
    return [replace(row, trace_context=text) for row in rows]


def _name_jobs(span: Span, handles: Sequence[JobHandle]) -> None:
    if len(handles) == 1:
        (handle,) = handles
        span.set_attribute("messaging.message.id", str(handle.id))
        span.set_attribute("tasklet.job.id", handle.id)
        # A unique job whose key was held: the handle is the holder's, nothing was added.
        span.set_attribute("tasklet.job.created", handle.created)
    elif handles:
        span.set_attribute("tasklet.job.ids", [h.id for h in handles])


# -------------------------------------------------------------------- run


def parent_context(trace_context: str | None) -> Context:
    """The context a job was deferred in, from its stored ``trace_context``.

    An empty context (the run is then a root span) when none was stored or it
    cannot be read: the worker's own context is never the parent.
    """
    from opentelemetry import propagate
    from opentelemetry.context import Context

    if trace_context is None:
        return Context()
    try:
        carrier = json.loads(trace_context)
    except ValueError:
        return Context()
    if not isinstance(carrier, dict):
        return Context()
    return propagate.extract(carrier, context=Context())


async def run(attempt: Attempt, perform: Callable[[Attempt], Awaitable[Outcome]]) -> Outcome:
    """``perform(attempt)`` inside a run span that is current while the job and hooks run."""
    from opentelemetry import trace
    from opentelemetry.trace import Link, SpanKind

    assert tracer is not None
    row = attempt.row
    parent = parent_context(row.trace_context)
    deferred = trace.get_current_span(parent).get_span_context()
    links = [Link(deferred)] if deferred.is_valid else None
    attributes: dict[str, Any] = {
        "messaging.system": _SYSTEM,
        "messaging.operation.type": "process",
        "messaging.operation.name": "run",
        "messaging.destination.name": row.queue,
        "messaging.message.id": str(row.id),
        "tasklet.job.id": row.id,
        "tasklet.job.name": row.name,
        "tasklet.job.attempt": row.attempts,
        "tasklet.job.max_attempts": row.max_attempts,
        "tasklet.worker.id": attempt.worker_id,
    }
    with tracer.start_as_current_span(
        f"tasklet.run {row.name}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        links=links,
        # The outcome says how the attempt ended; an exception escaping is the worker's.
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        outcome = await perform(attempt)
        _settle(span, outcome)
        return outcome


def _settle(span: Span, outcome: Outcome) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("tasklet.outcome", outcome.kind)
    step = outcome.step
    if step is not None:
        span.set_attribute("tasklet.next_status", step.status)
        if step.will_retry:
            # A retry, a snooze or a give-back at shutdown: when the job is due again.
            span.set_attribute("tasklet.requeued_in_s", step.delay_s)
    error = outcome.error
    if error is None:
        return
    if outcome.kind in _ERRORS:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, outcome.error_text))
    else:  # cancelled, snoozed, interrupted: how it ended, not a failure of the job
        span.add_event(f"tasklet.{outcome.kind}", {"tasklet.reason": str(error)})
