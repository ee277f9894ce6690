"""Helpers shared by the storage operations: clocks, filters, PostgreSQL text SQL."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence

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


# The worker's two statements per batch, as text: PostgreSQL-only constructs
# (LATERAL, recursive skip scan, json_to_recordset) that read better as SQL.

_PG_CLAIM = """
WITH RECURSIVE {queues_cte},
candidates AS (
    SELECT c.id, c.priority, c.run_at
      FROM queues AS q
     CROSS JOIN LATERAL (
            SELECT id, priority, run_at
              FROM {jobs}
             WHERE status = 'queued' AND queue = q.queue
               AND name = ANY(%(names)s::text[]) AND run_at <= now()
             ORDER BY priority, run_at, id
             LIMIT %(limit)s
               FOR UPDATE SKIP LOCKED) AS c
     WHERE q.queue IS NOT NULL
     ORDER BY c.priority, c.run_at, c.id
     LIMIT %(limit)s
)
UPDATE {jobs} AS j
   SET status = 'running', attempts = j.attempts + 1, locked_by = %(worker_id)s,
       started_at = now(), lease = j.lease + 1
  FROM candidates
 WHERE j.id = candidates.id
RETURNING j.id, j.name, j.queue, j.priority, j.serializer, j.args, j.args_pickle,
          j.attempts, j.max_attempts, j.timeout, j.run_at, j.lease
"""

# The worker's queues, or every queue that has queued jobs: a skip scan of the
# claim index finds each distinct queue with one probe.
_GIVEN_QUEUES = "queues(queue) AS (SELECT unnest(%(queues)s::text[]))"
_ALL_QUEUES = """queues(queue) AS (
    (SELECT queue FROM {jobs} WHERE status = 'queued' ORDER BY queue LIMIT 1)
    UNION ALL
    SELECT (SELECT j.queue FROM {jobs} AS j
             WHERE j.status = 'queued' AND j.queue > queues.queue
             ORDER BY j.queue LIMIT 1)
      FROM queues WHERE queues.queue IS NOT NULL
)"""

_PG_FINISH = """
WITH given AS (
    SELECT * FROM json_to_recordset(%(batch)s::json) AS g(
        job_id bigint, lease int, attempt int, worker_id text, status text, outcome text,
        started_at timestamptz, finished_at timestamptz, delay_s float8, refund int,
        record boolean, error text, traceback text, result jsonb)
),
updated AS (
    UPDATE {jobs} AS j
       SET status = g.status,
           run_at = CASE WHEN g.status = 'queued'
                         THEN now() + g.delay_s * interval '1 second' ELSE j.run_at END,
           finished_at = CASE WHEN g.status IN ('succeeded', 'failed', 'cancelled')
                              THEN g.finished_at END,
           locked_by = NULL,
           attempts = j.attempts - g.refund,
           last_error = g.error
      FROM given AS g
     WHERE j.id = g.job_id AND j.lease = g.lease AND j.status = 'running'
    RETURNING j.id
),
recorded AS (
    INSERT INTO {job_runs}
           (job_id, attempt, worker_id, outcome, started_at, finished_at, error, traceback, result)
    SELECT g.job_id, g.attempt, g.worker_id, g.outcome, g.started_at, g.finished_at,
           g.error, g.traceback, g.result
      FROM given AS g JOIN updated AS u ON u.id = g.job_id
     WHERE g.record
)
SELECT id FROM updated
"""


@functools.lru_cache(maxsize=64)
def pg_claim_sql(schema: str | None, all_queues: bool) -> str:
    jobs_table = table(schema, "jobs")
    queues_cte = (_ALL_QUEUES if all_queues else _GIVEN_QUEUES).format(jobs=jobs_table)
    return _PG_CLAIM.format(queues_cte=queues_cte, jobs=jobs_table)


@functools.lru_cache(maxsize=64)
def pg_finish_sql(schema: str | None) -> str:
    return _PG_FINISH.format(jobs=table(schema, "jobs"), job_runs=table(schema, "job_runs"))
