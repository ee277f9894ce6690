"""Enqueueing jobs with unique keys: a key held by a queued or running job returns that job.

The partial unique index ``ix_jobs_unique_key`` is the guarantee: an insert
whose key an active job holds does nothing (``ON CONFLICT ... DO NOTHING``),
and the holder is looked up instead. A holder can finish between the two, so
the keys left unsettled are tried again. Jobs without a key take the plain
insert of ``storage/jobs.py``, which this module leaves untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import anyio.to_thread
from sqlalchemy.engine import Connection

from .._database import Database
from ..errors import TaskletError
from ._sql import SQLITE_UNIQUE_HOLDER, sqlite_insert_sql
from .jobs import _json_text, _pg_insert_statement, sqlite_row_params
from .rows import NewJob, utcnow

#: Each try settles every key whose holder stays put while it runs; more tries than
#: this means jobs with these keys finish as fast as they are deferred.
MAX_TRIES = 20


class InsertedJob(NamedTuple):
    """The job a unique enqueue stands for: the one it added, or the one holding its key."""

    id: int
    name: str
    created: bool


class _UniqueBatch:
    """The rows of one enqueue, and what each try has settled of their keys."""

    def __init__(self, new_jobs: Sequence[NewJob]) -> None:
        self.rows = list(new_jobs)
        self.keyed: dict[str, InsertedJob] = {}
        self.keyless: list[int] = []
        self.tries = 0
        seen: set[str] = set()
        # A key given twice is written once; the later rows share its job.
        self.pending: list[NewJob] = []
        for row in self.rows:
            key = row.unique_key
            if key is None or key not in seen:
                self.pending.append(row)
                if key is not None:
                    seen.add(key)

    def absorb(self, results: Iterable[Sequence[Any]]) -> None:
        """Take one try's rows of (id, name, unique_key, created, ...)."""
        for job_id, name, key, created, *_ in results:
            if key is None:
                self.keyless.append(job_id)
            elif created or key not in self.keyed:
                # A holder read from the snapshot may have finished as this row went in.
                self.keyed[key] = InsertedJob(job_id, name, bool(created))
        self.pending = [
            r for r in self.pending if r.unique_key is not None and r.unique_key not in self.keyed
        ]
        self.tries += 1
        if self.pending and self.tries >= MAX_TRIES:
            raise TaskletError(
                f"could not enqueue the unique jobs {[r.unique_key for r in self.pending]}: "
                f"after {MAX_TRIES} tries their keys were each time taken by a job that "
                "finished before it could be read"
            )

    def result(self) -> list[InsertedJob]:
        # Keyless rows are always inserted, in the order given (ascending ids).
        keyless = iter(sorted(self.keyless))
        given: set[str] = set()
        handles = []
        for row in self.rows:
            key = row.unique_key
            if key is None:
                handles.append(InsertedJob(next(keyless), row.name, True))
                continue
            found = self.keyed[key]
            handles.append(found if key not in given else found._replace(created=False))
            given.add(key)
        return handles


def jobs_insert_unique(
    db: Database,
    new_jobs: Sequence[NewJob],
    conn: Connection | None = None,
    *,
    notify: bool = True,
) -> list[InsertedJob]:
    """Insert jobs whose key no active job holds; for the others, return the holder.

    Results come in the order given. With ``conn`` the rows join the caller's
    transaction. On PostgreSQL a key held by a job another transaction added
    and has not committed makes this wait for that transaction to end.
    """
    if not new_jobs:
        return []
    if conn is not None:
        with db.translate_errors():
            if conn.dialect.name == "postgresql":
                return _pg_insert(db, conn, new_jobs, notify)
            if conn.in_transaction():
                return _sqlite_insert(db, conn, new_jobs)
            with conn.begin():
                return _sqlite_insert(db, conn, new_jobs)
    if db.own_connections:
        return _pg_insert(db, None, new_jobs, notify)
    if db.dialect == "postgresql":
        with db.autocommit() as own:
            return _pg_insert(db, own, new_jobs, notify)
    with db.begin() as own:  # SQLite: one write transaction holds the lock throughout
        return _sqlite_insert(db, own, new_jobs)


async def jobs_insert_unique_async(
    db: Database, new_jobs: Sequence[NewJob], *, notify: bool = True
) -> list[InsertedJob]:
    """:func:`jobs_insert_unique` committing at once, for async callers (no thread hop
    on PostgreSQL with an engine tasklet made)."""
    if not new_jobs:
        return []
    if db.own_connections:
        batch = _UniqueBatch(new_jobs)
        while batch.pending:
            sql, params = _pg_statement(db, batch.pending, notify)
            batch.absorb(await db.driver_execute_async(sql, params))
        return batch.result()
    return await anyio.to_thread.run_sync(
        functools.partial(jobs_insert_unique, db, new_jobs, notify=notify)
    )


def _pg_statement(
    db: Database, pending: Sequence[NewJob], notify: bool
) -> tuple[str, dict[str, Any]]:
    sql, params = _pg_insert_statement(db, pending, notify, unique=True)
    params["keys"] = [r.unique_key for r in pending if r.unique_key is not None]
    return sql, params


def _pg_insert(
    db: Database, conn: Connection | None, new_jobs: Sequence[NewJob], notify: bool
) -> list[InsertedJob]:
    """Insert on ``conn``, or committing at once on a connection of tasklet's own (None)."""
    batch = _UniqueBatch(new_jobs)
    while batch.pending:
        sql, params = _pg_statement(db, batch.pending, notify)
        batch.absorb(db.driver_execute(conn, sql, params))
    return batch.result()


def _sqlite_insert(db: Database, conn: Connection, new_jobs: Sequence[NewJob]) -> list[InsertedJob]:
    """Row by row in the caller's write transaction: no other writer runs in between."""
    now = utcnow()
    batch = _UniqueBatch(new_jobs)
    while batch.pending:
        results: list[tuple[int, str, str | None, bool]] = []
        for row in batch.pending:
            shape, params = sqlite_row_params(row, now)
            if shape.serializer == "json":
                params["args"] = _json_text(row)
            sql = sqlite_insert_sql(shape, same=False, unique=True)
            inserted = db.driver_execute(conn, sql, params)
            if inserted:
                results.append((inserted[0][0], row.name, row.unique_key, True))
                continue
            holder = db.driver_execute(conn, SQLITE_UNIQUE_HOLDER, {"unique_key": row.unique_key})
            if holder:
                results.append((holder[0][0], holder[0][1], row.unique_key, False))
        batch.absorb(results)
    return batch.result()
