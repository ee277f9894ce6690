"""The values storage operations take and return, and timestamp helpers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

UTC = dt.UTC


def utcnow() -> dt.datetime:
    return dt.datetime.now(UTC)


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands timestamps back naive; tasklet stores them in UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def sqlite_time(value: dt.datetime) -> dt.datetime:
    """SQLite compares timestamps as text, so every stored one is naive UTC."""
    if value.tzinfo is not UTC:  # utcnow()'s are UTC already: an enqueue skips the shift
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None)


def sqlite_text(value: dt.datetime) -> str:
    """The text SQLAlchemy's SQLite DateTime stores (naive UTC, always with microseconds)."""
    return sqlite_time(value).isoformat(" ", "microseconds")


# NewJob, ClaimedJob and Completion are built once per job on the hot paths, so
# they are not frozen: a frozen dataclass's __init__ (object.__setattr__ per field)
# cost 2 µs of a bulk enqueue's ~20 µs a job.
@dataclass(slots=True)
class NewJob:
    """A row to insert into ``jobs``: when it is due is ``run_at``, or ``delay_s`` from now."""

    name: str
    queue: str
    priority: int
    max_attempts: int
    timeout: float | None
    serializer: str
    args: dict[str, Any] | None
    args_pickle: bytes | None
    run_at: dt.datetime | None = None
    delay_s: float = 0.0
    #: ``args`` as JSON text, when the caller already has it.
    args_json: str | None = None
    #: While a job with this key is queued or running, no other is added.
    unique_key: str | None = None
    #: At most ``concurrency_limit`` jobs with this key run at once.
    concurrency_key: str | None = None
    concurrency_limit: int | None = None
    #: The W3C trace context of the defer, as JSON (see tasklet.tracing); None when off.
    trace_context: str | None = None

    def same_but_args(self, other: NewJob) -> bool:
        """Whether the two rows differ in their arguments only (one bulk statement)."""
        return (
            self.name == other.name
            and self.queue == other.queue
            and self.priority == other.priority
            and self.max_attempts == other.max_attempts
            and self.timeout == other.timeout
            and self.serializer == other.serializer
            and self.run_at == other.run_at
            and self.delay_s == other.delay_s
            and self.unique_key == other.unique_key
            and self.concurrency_key == other.concurrency_key
            and self.concurrency_limit == other.concurrency_limit
            and self.trace_context == other.trace_context
        )


class NewJobBatch(list[NewJob]):
    """Rows one ``defer_many`` made for one job type: they differ in their arguments only.

    ``args_json`` is the JSON array of their arguments, encoded once for the
    payload-size check and sent as it is (a bulk insert need not compare the
    rows, nor encode them again).
    """

    __slots__ = ("args_json",)

    def __init__(self, rows: Iterable[NewJob], args_json: str) -> None:
        super().__init__(rows)
        self.args_json = args_json


@dataclass(frozen=True, slots=True)
class JobRow:
    """One row of ``jobs`` as tasklet reads it back."""

    id: int
    name: str
    queue: str
    priority: int
    status: str
    serializer: str
    args: dict[str, Any] | None
    args_pickle: bytes | None
    attempts: int
    max_attempts: int
    lost_count: int
    timeout: float | None
    run_at: dt.datetime
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    locked_by: str | None
    lease: int
    last_error: str | None
    unique_key: str | None = None
    concurrency_key: str | None = None
    concurrency_limit: int | None = None
    cancel_requested_at: dt.datetime | None = None
    trace_context: str | None = None

    @classmethod
    def from_mapping(cls, row: sa.RowMapping) -> JobRow:
        values = dict(row)
        for key in ("run_at", "created_at", "started_at", "finished_at", "cancel_requested_at"):
            values[key] = as_utc(values[key])
        return cls(**values)


@dataclass(slots=True)
class ClaimedJob:
    """A job a worker has just claimed: what it needs to run and finish one attempt."""

    id: int
    name: str
    queue: str
    priority: int
    serializer: str
    #: The stored arguments as JSON text (decoded by the job, on the worker's loop), or
    #: already decoded (tasklet.testing runs jobs without storing them).
    args: str | dict[str, Any] | None
    args_pickle: bytes | None
    attempts: int
    max_attempts: int
    timeout: float | None
    run_at: dt.datetime
    lease: int
    #: The defer's trace context (JSON), when tracing was on as it was deferred.
    trace_context: str | None = None
    #: Attempts lost with a crashed worker so far (see WorkerSettings.max_lost).
    lost_count: int = 0


@dataclass(frozen=True, slots=True)
class RunRow:
    """One row of ``job_runs``: the record of one attempt."""

    id: int
    job_id: int
    attempt: int
    worker_id: str | None
    outcome: str
    started_at: dt.datetime | None
    finished_at: dt.datetime
    error: str | None
    traceback: str | None
    result: Any

    @classmethod
    def from_mapping(cls, row: sa.RowMapping) -> RunRow:
        values = dict(row)
        for key in ("started_at", "finished_at"):
            values[key] = as_utc(values[key])
        return cls(**values)


@dataclass(slots=True)
class Completion:
    """How one attempt ended, and what becomes of its job.

    ``status`` is the job's next state; a ``queued`` job is due ``delay_s`` from
    now. ``refund`` gives the attempt back (shutdown, never started).
    ``record`` writes the attempt to ``job_runs``.
    """

    job_id: int
    lease: int
    attempt: int
    worker_id: str
    status: str
    outcome: str
    started_at: dt.datetime | None
    finished_at: dt.datetime
    delay_s: float = 0.0
    refund: bool = False
    record: bool = True
    error: str | None = None
    traceback: str | None = None
    result: Any = None
