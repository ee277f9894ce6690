"""A job for tests of tracing across processes; import as ``tests.tracing_jobs``.

Importing it turns tracing on in the worker process (the SDK, exporting nowhere);
the job appends, as a JSON line to $TASKLET_TEST_LOG, the trace it ran in.
"""

from __future__ import annotations

import json
import os

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider

import tasklet.tracing
from tasklet import JobContext, job

tasklet.tracing.instrument(TracerProvider())


@job(name="tests.tracing.where", queue="work")
def where(ctx: JobContext) -> None:
    span = trace.get_current_span()
    assert isinstance(span, ReadableSpan)
    context = span.get_span_context()
    parent = span.parent
    line = {
        "job_id": ctx.job_id,
        "span": span.name,
        "trace_id": f"{context.trace_id:032x}",
        "parent_span_id": None if parent is None else f"{parent.span_id:016x}",
    }
    with open(os.environ["TASKLET_TEST_LOG"], "a") as log:
        log.write(json.dumps(line) + "\n")
