"""OpenTelemetry tracing: a PRODUCER span per defer, a CONSUMER span per attempt, one trace."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import tasklet
from tasklet import JobContext, job, tracing
from tasklet._database import Database
from tasklet.testing import eager
from tests.support import (
    FAST,
    Backend,
    BackgroundWorker,
    Log,
    drain,
    finish,
    get_row,
    tasklet_process,
    wait_for,
)


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    provider = TracerProvider()
    yield provider
    provider.shutdown()


@pytest.fixture
def exporter(provider: TracerProvider) -> InMemorySpanExporter:
    """Every span the provider ends, whether or not tasklet is instrumented."""
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def spans(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> Iterator[InMemorySpanExporter]:
    """Tracing on, with spans exported to memory."""
    tracing.instrument(provider)
    yield exporter
    tracing.uninstrument()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def only(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    (span,) = named(exporter, name)
    return span


def wait_for_span(exporter: InMemorySpanExporter, name: str, count: int = 1) -> list[ReadableSpan]:
    wait_for(lambda: len(named(exporter, name)) >= count)
    return named(exporter, name)


def stored_ids(db: Database, job_id: int) -> tuple[int, int]:
    """The (trace id, span id) the job's stored ``traceparent`` names."""
    text = get_row(db, job_id).trace_context
    assert text is not None, "no trace context was stored with the job"
    _version, trace_id, span_id, _flags = json.loads(text)["traceparent"].split("-")
    return int(trace_id, 16), int(span_id, 16)


def ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


def parent_ids(span: ReadableSpan) -> tuple[int, int] | None:
    return None if span.parent is None else (span.parent.trace_id, span.parent.span_id)


# ------------------------------------------------------------------ defer


def test_a_defer_is_a_producer_span_whose_context_is_stored_with_the_job(
    db: Database, spans: InMemorySpanExporter
) -> None:
    @job(name="t.ok", queue="tq")
    def ok() -> None: ...

    handle = ok.defer()

    span = only(spans, "tasklet.defer t.ok")
    assert span.kind is SpanKind.PRODUCER
    assert span.attributes is not None
    assert dict(span.attributes) == {
        "messaging.system": "tasklet",
        "messaging.operation.type": "send",
        "messaging.operation.name": "defer",
        "messaging.destination.name": "tq",
        "tasklet.job.name": "t.ok",
        "messaging.message.id": str(handle.id),
        "tasklet.job.id": handle.id,
        "tasklet.job.created": True,
    }
    assert stored_ids(db, handle.id) == ids(span)


def test_a_defer_inside_an_application_span_joins_its_trace(
    db: Database, spans: InMemorySpanExporter, provider: TracerProvider
) -> None:
    @job(name="t.ok")
    def ok() -> None: ...

    with provider.get_tracer("app").start_as_current_span("request") as request:
        ok.defer_in(60)

    span = only(spans, "tasklet.defer t.ok")
    assert parent_ids(span) == (
        request.get_span_context().trace_id,
        request.get_span_context().span_id,
    )


def test_defer_many_is_one_span_naming_every_job_each_storing_its_context(
    db: Database, spans: InMemorySpanExporter
) -> None:
    @job(name="t.add")
    def add(n: int) -> None: ...

    handles = add.defer_many([{"n": 1}, {"n": 2}, {"n": 3}])

    span = only(spans, "tasklet.defer t.add")
    assert span.attributes is not None
    assert span.attributes["messaging.batch.message_count"] == 3
    assert list(span.attributes["tasklet.job.ids"]) == [h.id for h in handles]  # type: ignore[arg-type]
    assert {stored_ids(db, h.id) for h in handles} == {ids(span)}


def test_pickled_jobs_deferred_together_store_their_context_too(
    db: Database, spans: InMemorySpanExporter
) -> None:
    @job(name="t.pickled", serializer="pickle")
    def pickled(n: int) -> None: ...

    handles = pickled.defer_many([{"n": 1}, {"n": 2}])  # rows that differ in more than JSON

    span = only(spans, "tasklet.defer t.pickled")
    assert [stored_ids(db, h.id) for h in handles] == [ids(span), ids(span)]


def test_a_defer_on_the_callers_connection_stores_its_context_in_that_transaction(
    db: Database, spans: InMemorySpanExporter
) -> None:
    @job(name="t.ok")
    def ok() -> None: ...

    with db.engine.connect() as conn, conn.begin():
        handle = ok.options(connection=conn).defer()

    assert stored_ids(db, handle.id) == ids(only(spans, "tasklet.defer t.ok"))


def test_async_defers_are_spans_that_store_their_context(
    db: Database, spans: InMemorySpanExporter
) -> None:
    @job(name="t.ok")
    def ok() -> None: ...

    async def defer_both() -> list[tasklet.JobHandle]:
        return [await ok.defer_async(), *(await ok.defer_many_async([{}]))]

    handles = anyio.run(defer_both)

    assert [stored_ids(db, h.id) for h in handles] == [
        ids(s) for s in named(spans, "tasklet.defer t.ok")
    ]


def test_a_unique_defer_whose_key_is_held_names_the_holder_and_says_it_added_nothing(
    db: Database, spans: InMemorySpanExporter
) -> None:
    @job(name="t.once", unique=True)
    def once() -> None: ...

    first = once.defer()
    again = once.defer()

    assert again.id == first.id and not again.created
    first_span, again_span = named(spans, "tasklet.defer t.once")
    assert again_span.attributes is not None
    assert again_span.attributes["tasklet.job.id"] == first.id
    assert again_span.attributes["tasklet.job.created"] is False
    assert stored_ids(db, first.id) == ids(first_span), "the holder keeps its own context"


# -------------------------------------------------------------------- run


def test_a_sync_jobs_run_span_is_a_child_of_its_defer_and_current_in_its_thread(
    db: Database, spans: InMemorySpanExporter, provider: TracerProvider
) -> None:
    @job(name="t.sync", queue="tq")
    def work(ctx: JobContext) -> None:
        with provider.get_tracer("job").start_as_current_span("inside sync"):
            pass

    with BackgroundWorker(FAST):
        handle = work.defer()
        (run,) = wait_for_span(spans, "tasklet.run t.sync")

    deferred = only(spans, "tasklet.defer t.sync")
    assert run.kind is SpanKind.CONSUMER
    assert parent_ids(run) == ids(deferred)
    assert [(link.context.trace_id, link.context.span_id) for link in run.links] == [ids(deferred)]
    assert parent_ids(only(spans, "inside sync")) == ids(run)
    assert run.attributes is not None
    assert run.attributes["messaging.destination.name"] == "tq"
    assert run.attributes["tasklet.job.id"] == handle.id
    assert run.attributes["tasklet.job.attempt"] == 1
    assert run.attributes["tasklet.outcome"] == "succeeded"
    assert run.status.status_code is StatusCode.UNSET


def test_an_async_jobs_own_spans_nest_under_its_run_span(
    db: Database, spans: InMemorySpanExporter, provider: TracerProvider
) -> None:
    @job(name="t.async")
    async def work() -> None:
        with provider.get_tracer("job").start_as_current_span("inside async"):
            await anyio.sleep(0)

    with BackgroundWorker(FAST):
        work.defer()
        (run,) = wait_for_span(spans, "tasklet.run t.async")

    assert parent_ids(run) == ids(only(spans, "tasklet.defer t.async"))
    assert parent_ids(only(spans, "inside async")) == ids(run)


def test_hooks_run_inside_the_run_span(db: Database, spans: InMemorySpanExporter) -> None:
    seen: list[tuple[int, int]] = []

    @job(name="t.hooked")
    def work() -> None: ...

    @work.before_perform
    def before(ctx: JobContext) -> None:
        context = trace.get_current_span().get_span_context()
        seen.append((context.trace_id, context.span_id))

    work.defer()
    drain()

    assert seen == [ids(only(spans, "tasklet.run t.hooked"))]


def test_a_failed_attempt_is_an_error_span_with_the_exception_and_says_it_retries(
    db: Database, spans: InMemorySpanExporter
) -> None:
    @job(name="t.bad", max_attempts=2, backoff=0)
    def bad() -> None:
        raise ValueError("no good")

    bad.defer()
    drain()

    first, last = sorted(named(spans, "tasklet.run t.bad"), key=lambda s: s.start_time or 0)
    for span in (first, last):
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "ValueError: no good"
        (event,) = span.events
        assert event.name == "exception"
        assert event.attributes is not None
        assert event.attributes["exception.type"] == "ValueError"
    assert first.attributes is not None and last.attributes is not None
    assert (first.attributes["tasklet.job.attempt"], first.attributes["tasklet.next_status"]) == (
        1,
        "queued",
    )
    assert first.attributes["tasklet.requeued_in_s"] == 0
    assert (last.attributes["tasklet.job.attempt"], last.attributes["tasklet.next_status"]) == (
        2,
        "failed",
    )


def test_a_timed_out_attempt_is_an_error_span(db: Database, spans: InMemorySpanExporter) -> None:
    @job(name="t.slow", timeout=0.05, max_attempts=1)
    async def slow() -> None:
        await anyio.sleep(30)

    slow.defer()
    drain()

    run = only(spans, "tasklet.run t.slow")
    assert run.attributes is not None
    assert run.attributes["tasklet.outcome"] == "timed_out"
    assert run.status.status_code is StatusCode.ERROR
    assert [e.name for e in run.events] == ["exception"]


def test_a_snoozed_attempt_is_visible_and_not_an_error(
    db: Database, spans: InMemorySpanExporter
) -> None:
    calls: list[int] = []

    @job(name="t.snooze")
    def later() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise tasklet.Snooze(0)

    later.defer()
    drain()

    snoozed, done = sorted(named(spans, "tasklet.run t.snooze"), key=lambda s: s.start_time or 0)
    assert snoozed.attributes is not None and done.attributes is not None
    assert snoozed.attributes["tasklet.outcome"] == "snoozed"
    assert snoozed.status.status_code is StatusCode.UNSET
    assert [e.name for e in snoozed.events] == ["tasklet.snoozed"]
    assert done.attributes["tasklet.outcome"] == "succeeded"
    assert parent_ids(snoozed) == parent_ids(done), "every attempt is a child of the one defer"


def test_a_cancelled_attempt_is_visible_and_not_an_error(
    db: Database, spans: InMemorySpanExporter
) -> None:
    @job(name="t.cancel")
    def gives_up() -> None:
        raise tasklet.Cancel("not needed any more")

    gives_up.defer()
    drain()

    run = only(spans, "tasklet.run t.cancel")
    assert run.attributes is not None
    assert run.attributes["tasklet.outcome"] == "cancelled"
    assert run.status.status_code is StatusCode.UNSET
    (event,) = run.events
    assert event.name == "tasklet.cancelled"
    assert event.attributes is not None
    assert event.attributes["tasklet.reason"] == "not needed any more"


def test_a_job_deferred_while_tracing_was_off_runs_in_a_root_span(
    db: Database, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    @job(name="t.ok")
    def ok() -> None: ...

    handle = ok.defer()
    tracing.instrument(provider)
    try:
        drain()
    finally:
        tracing.uninstrument()

    assert get_row(db, handle.id).trace_context is None
    run = only(exporter, "tasklet.run t.ok")
    assert run.parent is None and not run.links


def test_an_eager_run_is_a_child_of_its_defer(
    backend: Backend, spans: InMemorySpanExporter
) -> None:
    @job(name="t.eager")
    def work() -> None: ...

    with eager():
        work.defer()

    assert parent_ids(only(spans, "tasklet.run t.eager")) == ids(
        only(spans, "tasklet.defer t.eager")
    )


@pytest.mark.slow
def test_a_worker_process_runs_the_job_in_the_trace_it_was_deferred_in(
    backend: Backend, db: Database, spans: InMemorySpanExporter, log: Log
) -> None:
    # The worker process runs tests/tracing_jobs.py's job of this name (and traces there).
    @job(name="tests.tracing.where", queue="work")
    def where() -> None: ...

    handle = where.defer()
    deferred = only(spans, "tasklet.defer tests.tracing.where")
    assert stored_ids(db, handle.id) == ids(deferred)

    process = tasklet_process(backend, log, "workoff", "--import", "tests.tracing_jobs")
    code, output = finish(process)

    assert code == 0, output
    (line,) = [json.loads(text) for text in log.path.read_text().splitlines()]
    trace_id, span_id = ids(deferred)
    assert line == {
        "job_id": handle.id,
        "span": "tasklet.run tests.tracing.where",
        "trace_id": f"{trace_id:032x}",
        "parent_span_id": f"{span_id:016x}",
    }


# -------------------------------------------------------------------- off


def test_nothing_is_stored_and_no_span_made_while_tracing_is_off(
    db: Database, exporter: InMemorySpanExporter
) -> None:
    @job(name="t.ok")
    def ok() -> None: ...

    handles = [ok.defer(), *ok.defer_many([{}, {}])]
    drain()

    assert exporter.get_finished_spans() == ()
    assert [get_row(db, h.id).trace_context for h in handles] == [None, None, None]
    assert {get_row(db, h.id).status for h in handles} == {"succeeded"}


def test_instrument_without_opentelemetry_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A None entry in sys.modules makes the import fail as if the package were absent.
    monkeypatch.setitem(sys.modules, "opentelemetry", None)

    with pytest.raises(tasklet.TaskletError, match=r"pip install 'tasklet\[otel\]'"):
        tracing.instrument()

    assert not tracing.is_instrumented()


def test_uninstrument_stops_tracing(db: Database, spans: InMemorySpanExporter) -> None:
    @job(name="t.ok")
    def ok() -> None: ...

    tracing.uninstrument()
    handle = ok.defer()

    assert not tracing.is_instrumented()
    assert spans.get_finished_spans() == ()
    assert get_row(db, handle.id).trace_context is None
