"""Helpers shared by the storage operations: clocks, filters, PostgreSQL text SQL."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections.abc import Sequence
from typing import Final, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..schema import jobs
from .rows import sqlite_time, utcnow


def now(conn: Connection) -> sa.ColumnElement[dt.datetime]:
    """The database's clock on PostgreSQL (one clock for every machine); the process's on SQLite."""
    if conn.dialect.name == "postgresql":
        return sa.func.now()
    return sa.literal(sqlite_time(utcnow()), sa.DateTime())


def ago(conn: Connection, seconds: float) -> sa.ColumnElement[dt.datetime]:
    if conn.dialect.name == "postgresql":
        return sa.func.now() - sa.literal(dt.timedelta(seconds=seconds), sa.Interval())
    return sa.literal(sqlite_time(utcnow() - dt.timedelta(seconds=seconds)), sa.DateTime())


def stamp(conn: Connection, value: dt.datetime | None) -> dt.datetime | None:
    """A timestamp as this database stores it (SQLite: naive UTC text)."""
    if value is None or conn.dialect.name == "postgresql":
        return value
    return sqlite_time(value)


def in_queues(queues: Sequence[str] | None) -> sa.ColumnElement[bool]:
    return sa.true() if not queues else jobs.c.queue.in_(queues)


def table(schema: str | None, name: str) -> str:
    """A table's name for text SQL (the schema is a checked identifier, see _database)."""
    return name if schema is None else f'"{schema}".{name}'


# Enqueue. One statement, one round trip, and in autocommit one commit: the
# rows go in, and pg_notify tells listening workers once the transaction commits.

INSERT_COLUMNS: Final = (
    "name", "queue", "priority", "status", "serializer", "args", "args_pickle", "attempts",
    "max_attempts", "lost_count", "timeout", "run_at", "created_at", "lease", "unique_key",
    "concurrency_key", "concurrency_limit", "trace_context",
)  # fmt: skip
#: Columns a new row binds only when it has a value; the statement says NULL otherwise.
OPTIONAL_COLUMNS: Final = (
    "timeout", "unique_key", "concurrency_key", "concurrency_limit", "trace_context"
)  # fmt: skip


class RowShape(NamedTuple):
    """Which values a single-row (or same-but-arguments) insert binds as parameters.

    Every bound parameter costs the client and the server a few µs of a one-row
    enqueue that is bound by its round trip: a job that sets no timeout, key or
    trace binds five, not fifteen. Each shape is one statement text, which the
    driver prepares once per connection.
    """

    serializer: str  # 'json' binds args, 'pickle' binds args_pickle
    due: str  # 'now', 'at' (binds run_at) or 'in' (binds delay_s; SQLite: run_at)
    bound: tuple[str, ...]  # the OPTIONAL_COLUMNS this row has a value for


def _insert_values(postgres: bool, shape: RowShape, *, same: bool) -> str:
    """The value of each of INSERT_COLUMNS; ``same`` reads the arguments from ``a.value``."""

    def bind(name: str) -> str:
        return f"%({name})s" if postgres else f":{name}"

    now = "now()" if postgres else ":now"
    if same:
        args = "a.value::jsonb" if postgres else "a.value"
    else:
        args = f"{bind('args')}::jsonb" if postgres else bind("args")
    if shape.due == "now":
        run_at = now
    elif not postgres:  # the caller works out when it is due, by the process's clock
        run_at = bind("run_at")
    elif shape.due == "in":
        run_at = f"now() + {bind('delay_s')} * interval '1 second'"
    else:
        run_at = f"{bind('run_at')}::timestamptz"
    pickled = shape.serializer == "pickle"
    values = {
        "name": bind("name"),
        "queue": bind("queue"),
        "priority": bind("priority"),
        "status": "'queued'",
        "serializer": "'pickle'" if pickled else "'json'",
        "args": "NULL" if pickled else args,
        "args_pickle": bind("args_pickle") if pickled else "NULL",
        "attempts": "0",
        "max_attempts": bind("max_attempts"),
        "lost_count": "0",
        "run_at": run_at,
        "created_at": now,
        "lease": "0",
        **{c: bind(c) if c in shape.bound else "NULL" for c in OPTIONAL_COLUMNS},
    }
    return ", ".join(values[c] for c in INSERT_COLUMNS)


# Many rows travel as one JSON array that PostgreSQL unpacks with
# json_to_recordset: the client pays one json.dumps, not an adapter per value.
_PG_INSERT_MANY = """
INSERT INTO {jobs} ({columns})
SELECT r.name, r.queue, r.priority, 'queued', r.serializer, r.args,
       decode(r.args_pickle, 'base64'), 0, r.max_attempts, 0, r.timeout,
       COALESCE(r.run_at, now() + r.delay_s * interval '1 second'), now(), 0,
       r.unique_key, r.concurrency_key, r.concurrency_limit, r.trace_context
  FROM json_to_recordset(%(rows)s::json) AS r(
       name text, queue text, priority int, max_attempts int, timeout float8,
       serializer text, args jsonb, args_pickle text, run_at timestamptz, delay_s float8,
       unique_key text, concurrency_key text, concurrency_limit int, trace_context text)
RETURNING id, queue
"""


def _pg_insert(schema: str | None, shape: RowShape | None, same: bool) -> str:
    """Insert one row, rows that differ in their arguments only (``same``), or any rows
    (``shape`` None: defer_many of rows that differ in more)."""
    columns = ", ".join(INSERT_COLUMNS)
    if shape is None:
        return _PG_INSERT_MANY.format(jobs=table(schema, "jobs"), columns=columns)
    values = _insert_values(True, shape, same=same)
    rows = (
        # defer_many: the rows differ in their arguments only, sent as one JSON array.
        f"SELECT {values}\n  FROM json_array_elements(%(args)s::json) WITH ORDINALITY"
        " AS a(value, n)\n ORDER BY a.n"
        if same
        else f"VALUES ({values})"
    )
    return f"INSERT INTO {table(schema, 'jobs')} ({columns})\n{rows}\nRETURNING id, queue"


@functools.lru_cache(maxsize=256)
def pg_insert_sql(schema: str | None, shape: RowShape | None, *, same: bool, notify: bool) -> str:
    """Insert jobs (see :func:`_pg_insert`), returning (id, queue) or, with ``notify``,
    (id, NOTIFY of its queue)."""
    insert = _pg_insert(schema, shape, same)
    if not notify:
        return insert
    return f"WITH inserted AS ({insert}) SELECT id, pg_notify(%(channel)s, queue) FROM inserted"


# Unique jobs (storage/unique.py): the same inserts, leaving out a row whose key an
# active job holds (the partial index ix_jobs_unique_key), and returning that job
# instead in the same round trip. The lookup reads the statement's snapshot, so a
# holder that committed while the insert waited on it is found by the next try.
_UNIQUE_ACTIVE = "unique_key IS NOT NULL AND status IN ('queued', 'running')"
_PG_UNIQUE = """
WITH inserted AS (
{insert}
    ON CONFLICT (unique_key) WHERE {active} DO NOTHING
    RETURNING id, name, queue, unique_key
)
SELECT id, name, unique_key, true, {notify} FROM inserted
UNION ALL
SELECT id, name, unique_key, false, NULL FROM {jobs}
 WHERE unique_key = ANY(%(keys)s::text[]) AND {active}
"""


@functools.lru_cache(maxsize=256)
def pg_insert_unique_sql(
    schema: str | None, shape: RowShape | None, *, same: bool, notify: bool
) -> str:
    """:func:`pg_insert_sql` for jobs with unique keys: rows of (id, name, key, created)."""
    insert = _pg_insert(schema, shape, same)
    return _PG_UNIQUE.format(
        insert=insert.rpartition("RETURNING")[0].rstrip(),
        active=_UNIQUE_ACTIVE,
        notify="pg_notify(%(channel)s, queue)::text" if notify else "NULL",
        jobs=table(schema, "jobs"),
    )


@functools.lru_cache(maxsize=256)
def sqlite_insert_sql(shape: RowShape, *, same: bool, unique: bool = False) -> str:
    """SQLite: one row, or rows that differ in their arguments only (JSON1's json_each).

    Timestamps are naive UTC text (see rows.sqlite_time), bound by the caller as
    ``now`` and, for a row due later, ``run_at``. ``unique`` (one row) leaves out a
    row whose key an active job holds. Every form but one plain row returns the ids.
    """
    columns = ", ".join(INSERT_COLUMNS)
    values = _insert_values(False, shape, same=same)
    if same:
        rows = f"SELECT {values}\n  FROM json_each(:args) AS a\n ORDER BY a.key"
    else:
        rows = f"VALUES ({values})"
    insert = f"INSERT INTO jobs ({columns})\n{rows}"
    if unique:
        return f"{insert}\nON CONFLICT (unique_key) WHERE {_UNIQUE_ACTIVE} DO NOTHING\nRETURNING id"
    # One row: its id is the cursor's lastrowid (see Database.driver_execute).
    return f"{insert}\nRETURNING id" if same else insert


SQLITE_UNIQUE_HOLDER = (
    f"SELECT id, name FROM jobs WHERE unique_key = :unique_key AND {_UNIQUE_ACTIVE}"
)


# The worker's two statements per batch, as text: PostgreSQL-only constructs
# (LATERAL, recursive skip scan, json_to_recordset) that read better as SQL.

# Every PostgreSQL claim ends the same way: the chosen candidates start, each under a new lease.
_TAKE_CANDIDATES = """UPDATE {jobs} AS j
   SET status = 'running', attempts = j.attempts + 1, locked_by = %(worker_id)s,
       started_at = now(), lease = j.lease + 1
  FROM candidates
 WHERE j.id = candidates.id
RETURNING j.id, j.name, j.queue, j.priority, j.serializer, j.args::text, j.args_pickle,
          j.attempts, j.max_attempts, j.timeout, j.run_at, j.lease, j.trace_context,
          j.lost_count"""

_PG_CLAIM = """
WITH RECURSIVE {queues_cte},
candidates AS (
    SELECT c.id, c.priority, c.run_at
      FROM queues AS q
     CROSS JOIN LATERAL (
            SELECT id, priority, run_at
              FROM {jobs}
             WHERE status = 'queued' AND concurrency_key IS NULL AND queue = q.queue
               AND name = ANY(%(names)s::text[]) AND run_at <= now()
               AND lost_count < %(lost_below)s
             ORDER BY priority, run_at, id
             LIMIT %(limit)s
               FOR UPDATE SKIP LOCKED) AS c
     WHERE q.queue IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM {paused} AS p WHERE p.queue = q.queue)
     ORDER BY c.priority, c.run_at, c.id
     LIMIT %(limit)s
)
{take}
"""

# The worker's queues, or every queue that has queued jobs: a skip scan of the
# claim index finds each distinct queue with one probe.
_GIVEN_QUEUES = "queues(queue) AS (SELECT unnest(%(queues)s::text[]))"
_ALL_QUEUES = """queues(queue) AS (
    (SELECT queue FROM {jobs} WHERE status = 'queued' AND concurrency_key IS NULL
      ORDER BY queue LIMIT 1)
    UNION ALL
    SELECT (SELECT j.queue FROM {jobs} AS j
             WHERE j.status = 'queued' AND j.concurrency_key IS NULL AND j.queue > queues.queue
             ORDER BY j.queue LIMIT 1)
      FROM queues WHERE queues.queue IS NOT NULL
)"""

# A job whose cancel was requested is never queued again: a would-be retry,
# snooze or release of it ends it as cancelled (the attempt's run keeps its outcome).
# The batch leaves out what is null or usual (see attempts._finish_row): parsing it
# is a fifth of the statement's time, and most attempts just succeed.
_PG_FINISH = """
WITH given AS (
    SELECT g.job_id, g.lease, g.attempt, g.worker_id, g.status,
           COALESCE(g.outcome, g.status) AS outcome, g.started_at, g.finished_at,
           COALESCE(g.delay_s, 0) AS delay_s, COALESCE(g.refund, 0) AS refund,
           COALESCE(g.record, true) AS record, g.error, g.traceback, g.result
      FROM json_to_recordset(%(batch)s::json) AS g(
        job_id bigint, lease int, attempt int, worker_id text, status text, outcome text,
        started_at timestamptz, finished_at timestamptz, delay_s float8, refund int,
        record boolean, error text, traceback text, result jsonb)
),
updated AS (
    UPDATE {jobs} AS j
       SET status = CASE WHEN g.status = 'queued' AND j.cancel_requested_at IS NOT NULL
                         THEN 'cancelled' ELSE g.status END,
           run_at = CASE WHEN g.status = 'queued'
                         THEN now() + g.delay_s * interval '1 second' ELSE j.run_at END,
           finished_at = CASE WHEN g.status <> 'queued' OR j.cancel_requested_at IS NOT NULL
                              THEN g.finished_at END,
           locked_by = NULL,
           attempts = j.attempts - g.refund,
           last_error = g.error
      FROM given AS g
     WHERE j.id = g.job_id AND j.lease = g.lease AND j.status = 'running'
    RETURNING j.id, j.status
),
recorded AS (
    INSERT INTO {job_runs}
           (job_id, attempt, worker_id, outcome, started_at, finished_at, error, traceback, result)
    SELECT g.job_id, g.attempt, g.worker_id, g.outcome, g.started_at, g.finished_at,
           g.error, g.traceback, g.result
      FROM given AS g JOIN updated AS u ON u.id = g.job_id
     WHERE g.record
),
-- For result() waiters (tasklet.results): one NOTIFY per batch that finished jobs, and only
-- while a process waits (its listener is connected), since a NOTIFY serializes commits.
-- A payload over PostgreSQL's 8000-byte limit would fail the finish: send '' ("look at all").
done AS (
    SELECT pg_notify({done_channel}, CASE WHEN length(ids) < 7900 THEN ids ELSE '' END)
      FROM (SELECT string_agg(id::text, ',') AS ids FROM updated
             WHERE status IN ('succeeded', 'failed', 'cancelled')) AS t
     WHERE ids IS NOT NULL
       AND EXISTS (SELECT 1 FROM pg_stat_activity
                    WHERE application_name = {listener} AND datname = current_database())
)
SELECT id FROM updated WHERE (SELECT count(*) FROM done) >= 0
"""


@functools.lru_cache(maxsize=64)
def pg_claim_sql(schema: str | None, all_queues: bool) -> str:
    jobs_table = table(schema, "jobs")
    queues_cte = (_ALL_QUEUES if all_queues else _GIVEN_QUEUES).format(jobs=jobs_table)
    return _PG_CLAIM.format(
        queues_cte=queues_cte,
        jobs=jobs_table,
        paused=table(schema, "paused_queues"),
        take=_TAKE_CANDIDATES.format(jobs=jobs_table),
    )


# Claims of jobs under a concurrency limit (only by workers that run such jobs). On
# PostgreSQL two statements in one short transaction: the first finds candidate keys
# and takes a transaction-scoped advisory lock on each (skipping keys another
# claimer holds); the second, whose snapshot is taken after the locks, counts each
# key's running jobs and claims up to its limit. Counting in the first statement
# would read a snapshot from before a concurrent claimer's commit, and overshoot.
#
# Candidate keys come from a skip scan of the limited claim index, bounded to
# %(visit)s keys and resumed after the last key seen (so every key gets its turn).
# A key is a candidate when one of its first due jobs is this worker's, and it
# does not look full. Marker rows tell where the scan stopped: a NULL key (the
# end), or the %(visit)s-th key.
_PG_LIMITED_KEYS = """
WITH RECURSIVE keys(key, n) AS (
    (SELECT concurrency_key, 1 FROM {jobs}
      WHERE status = 'queued' AND concurrency_key > %(after)s
      ORDER BY concurrency_key LIMIT 1)
    UNION ALL
    SELECT (SELECT j.concurrency_key FROM {jobs} AS j
             WHERE j.status = 'queued' AND j.concurrency_key > keys.key
             ORDER BY j.concurrency_key LIMIT 1),
           keys.n + 1
      FROM keys WHERE keys.key IS NOT NULL AND keys.n < %(visit)s
)
SELECT k.n, k.key, h.lim,
       CASE WHEN h.lim IS NOT NULL
            THEN pg_try_advisory_xact_lock(%(lock_space)s, hashtext(k.key)) END
  FROM keys AS k
  LEFT JOIN LATERAL (
        SELECT d.concurrency_limit AS lim
          FROM (SELECT name, queue, concurrency_limit FROM {jobs} AS c
                 WHERE c.status = 'queued' AND c.concurrency_key = k.key AND c.run_at <= now()
                   AND c.lost_count < %(lost_below)s
                 ORDER BY c.priority, c.run_at, c.id
                 LIMIT 8) AS d
         WHERE d.name = ANY(%(names)s::text[]) {queue_filter}
           AND NOT EXISTS (SELECT 1 FROM {paused} AS p WHERE p.queue = d.queue)
           AND (SELECT count(*) FROM {jobs} AS r
                 WHERE r.status = 'running' AND r.concurrency_key = k.key) < d.concurrency_limit
         LIMIT 1) AS h ON true
 WHERE h.lim IS NOT NULL OR k.key IS NULL OR k.n = %(visit)s
 LIMIT %(limit)s
"""

_PG_LIMITED_CLAIM = """
WITH keys AS (
    SELECT k.key, k.lim - (SELECT count(*) FROM {jobs} AS r
                            WHERE r.status = 'running' AND r.concurrency_key = k.key) AS room
      FROM unnest(%(keys)s::text[], %(limits)s::int[]) AS k(key, lim)
),
candidates AS (
    SELECT c.id, c.priority, c.run_at
      FROM keys AS k
     CROSS JOIN LATERAL (
            SELECT d.id, d.priority, d.run_at
              FROM {jobs} AS d
             WHERE d.status = 'queued' AND d.concurrency_key = k.key
               AND d.name = ANY(%(names)s::text[]) AND d.run_at <= now() {queue_filter}
               AND d.lost_count < %(lost_below)s
               AND NOT EXISTS (SELECT 1 FROM {paused} AS p WHERE p.queue = d.queue)
             ORDER BY d.priority, d.run_at, d.id
             LIMIT greatest(k.room, 0)
               FOR UPDATE SKIP LOCKED) AS c
     ORDER BY c.priority, c.run_at, c.id
     LIMIT %(limit)s
)
{take}
"""


@functools.lru_cache(maxsize=64)
def pg_limited_claim_sql(schema: str | None, all_queues: bool) -> tuple[str, str]:
    """The limited claim's two statements: lock the candidate keys, then claim."""
    queue_filter = "" if all_queues else "AND d.queue = ANY(%(queues)s::text[])"
    names = {"jobs": table(schema, "jobs"), "paused": table(schema, "paused_queues")}
    return (
        _PG_LIMITED_KEYS.format(queue_filter=queue_filter, **names),
        _PG_LIMITED_CLAIM.format(
            queue_filter=queue_filter, take=_TAKE_CANDIDATES.format(jobs=names["jobs"]), **names
        ),
    )


def done_channel(schema: str | None) -> str:
    """The channel finishes notify with the ids of jobs that reached a final state."""
    channel = "tasklet_done" if schema is None else f"tasklet_{schema}_done"
    if schema is not None and len(channel) > 63:  # PostgreSQL's limit for channel names
        channel = f"tasklet_done_{hashlib.sha1(schema.encode()).hexdigest()[:16]}"
    return channel


def done_listener(schema: str | None) -> str:
    """The application_name of a connection LISTENing on :func:`done_channel`."""
    return f"tasklet-results {done_channel(schema)}"[:63]


@functools.lru_cache(maxsize=64)
def pg_finish_sql(schema: str | None) -> str:
    return _PG_FINISH.format(
        jobs=table(schema, "jobs"),
        job_runs=table(schema, "job_runs"),
        # The schema is a checked identifier: both are safe to inline.
        done_channel=f"'{done_channel(schema)}'",
        listener=f"'{done_listener(schema)}'",
    )


# SQLite's worker statements, with the lists and the batch as JSON (JSON1).
SQLITE_CLAIM = """
UPDATE jobs
   SET status = 'running', attempts = attempts + 1, locked_by = :worker_id,
       started_at = :now, lease = lease + 1
 WHERE id IN (
       SELECT id FROM jobs
        WHERE status = 'queued' AND concurrency_key IS NULL {queue_filter}
          AND name IN (SELECT value FROM json_each(:names)) AND run_at <= :now
          AND lost_count < :lost_below
          AND queue NOT IN (SELECT queue FROM paused_queues)
        ORDER BY priority, run_at, id
        LIMIT :limit)
RETURNING id, name, queue, priority, serializer, args, args_pickle, attempts, max_attempts,
          timeout, run_at, lease, trace_context, lost_count
"""
SQLITE_QUEUE_FILTER = "AND queue IN (SELECT value FROM json_each(:queues))"
# A worker of every queue names the queues that have work, found by a skip scan
# of the claim index: with ``queue = ?`` per queue SQLite reads each queue's best
# jobs in index order and stops at the limit, where no queue filter at all would
# read and sort the whole backlog on every claim.
SQLITE_QUEUES_WITH_WORK = """AND queue IN (
              WITH RECURSIVE queued(queue) AS (
                   SELECT min(queue) FROM jobs
                    WHERE status = 'queued' AND concurrency_key IS NULL
                    UNION ALL
                   SELECT (SELECT min(j.queue) FROM jobs AS j
                            WHERE j.status = 'queued' AND j.concurrency_key IS NULL
                              AND j.queue > queued.queue)
                     FROM queued WHERE queued.queue IS NOT NULL)
              SELECT queue FROM queued WHERE queue IS NOT NULL)"""

# Under the write lock one statement is race-free: rank each key's due jobs and
# claim those that fit in the room its running jobs leave.
SQLITE_LIMITED_CLAIM = """
UPDATE jobs
   SET status = 'running', attempts = attempts + 1, locked_by = :worker_id,
       started_at = :now, lease = lease + 1
 WHERE id IN (
       SELECT id FROM (
              SELECT c.id, c.priority, c.run_at, row_number() OVER by_key AS rank,
                     first_value(c.concurrency_limit) OVER by_key - coalesce(r.n, 0) AS room
                FROM jobs AS c
                LEFT JOIN (SELECT concurrency_key, count(*) AS n FROM jobs
                            WHERE status = 'running' AND concurrency_key IS NOT NULL
                            GROUP BY concurrency_key) AS r
                       ON r.concurrency_key = c.concurrency_key
               WHERE c.status = 'queued' AND c.concurrency_key IS NOT NULL {queue_filter}
                 AND c.name IN (SELECT value FROM json_each(:names)) AND c.run_at <= :now
                 AND c.lost_count < :lost_below
                 AND c.queue NOT IN (SELECT queue FROM paused_queues)
              WINDOW by_key AS (PARTITION BY c.concurrency_key
                                ORDER BY c.priority, c.run_at, c.id))
        WHERE rank <= room
        ORDER BY priority, run_at, id
        LIMIT :limit)
RETURNING id, name, queue, priority, serializer, args, args_pickle, attempts, max_attempts,
          timeout, run_at, lease, trace_context, lost_count
"""

SQLITE_FINISH = """
UPDATE jobs
   SET status = CASE WHEN g.value ->> 'status' = 'queued'
                          AND jobs.cancel_requested_at IS NOT NULL
                     THEN 'cancelled' ELSE g.value ->> 'status' END,
       locked_by = NULL,
       last_error = g.value ->> 'error',
       attempts = jobs.attempts - (g.value ->> 'refund'),
       finished_at = CASE WHEN g.value ->> 'status' <> 'queued'
                               OR jobs.cancel_requested_at IS NOT NULL
                          THEN g.value ->> 'finished_at' END,
       run_at = coalesce(g.value ->> 'run_at', jobs.run_at)
  FROM json_each(:batch) AS g
 WHERE jobs.id = g.value ->> 'job_id' AND jobs.lease = g.value ->> 'lease'
   AND jobs.status = 'running'
RETURNING jobs.id
"""

SQLITE_RECORD_RUNS = """
INSERT INTO job_runs
       (job_id, attempt, worker_id, outcome, started_at, finished_at, error, traceback, result)
SELECT g.value ->> 'job_id', g.value ->> 'attempt', g.value ->> 'worker_id',
       g.value ->> 'outcome', g.value ->> 'started_at', g.value ->> 'finished_at',
       g.value ->> 'error', g.value ->> 'traceback', g.value -> 'result'
  FROM json_each(:runs) AS g
"""
