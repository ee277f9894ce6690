"""Claims of jobs under a concurrency limit, for the workers that run such jobs.

A :class:`~tasklet.storage.attempts.Claimer` holds one of these only when its
worker has a job type with a limit: other workers never pay for the feature.
The statements are in ``_sql`` (``pg_limited_claim_sql``, ``SQLITE_LIMITED_CLAIM``).
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Sequence
from typing import Any

from sqlalchemy import exc
from sqlalchemy.engine import Connection

from .._database import Database
from ._sql import SQLITE_LIMITED_CLAIM, SQLITE_QUEUE_FILTER, pg_limited_claim_sql
from .rows import sqlite_text, utcnow

#: Concurrency keys one claim looks at, at most; the next claim resumes after them.
VISIT = 256


def lock_space(schema: str | None) -> int:
    """The namespace (a signed int4) of a schema's advisory locks on concurrency keys."""
    return zlib.crc32(f"tasklet.concurrency:{schema or ''}".encode()) - 2**31


class LimitedClaims:
    """The limited half of one worker's claims, and where its scan of keys resumes."""

    def __init__(
        self, db: Database, *, worker_id: str, queues: list[str] | None, names: Sequence[str]
    ) -> None:
        self._db = db
        self._params: dict[str, Any] = {"worker_id": worker_id, "queues": queues, "names": names}
        self._after = ""
        #: Whether the last claim left keys it could not look at: held by another claimer
        #: at that moment, or past the bound of its scan.
        self.retry_soon = False
        self._lock_space = lock_space(db.schema)

    def claim_pg(self, conn: Connection, limit: int, lost_below: int) -> list[Any]:
        """Rows claimed in one short transaction: lock the candidate keys, then count and claim.

        The count runs in a statement of its own, after the locks: in READ
        COMMITTED it then sees every claim of the key committed before the lock
        was granted (the lock's own statement reads an older snapshot).
        """
        keys_sql, claim_sql = pg_limited_claim_sql(self._db.schema, self._params["queues"] is None)
        params = {**self._params, "limit": limit, "lost_below": lost_below}
        # The advisory locks last until COMMIT: the transaction holds these statements only.
        conn.exec_driver_sql("BEGIN")
        try:
            found = self._db.driver_execute(
                conn,
                keys_sql,
                {**params, "after": self._after, "visit": VISIT, "lock_space": self._lock_space},
            )
            # Resume after the last key seen, or from the start once the scan reached the end.
            self._after = "" if not found or found[-1][1] is None else found[-1][1]
            keys = [(key, lim) for _, key, lim, locked in found if lim is not None and locked]
            held = any(lim is not None and not locked for _, _, lim, locked in found)
            cut_short = bool(found) and found[-1][0] == VISIT and found[-1][1] is not None
            self.retry_soon = held or cut_short
            rows = []
            if keys:
                rows = self._db.driver_execute(
                    conn,
                    claim_sql,
                    {**params, "keys": [k for k, _ in keys], "limits": [n for _, n in keys]},
                )
            conn.exec_driver_sql("COMMIT")
        except BaseException:
            with contextlib.suppress(exc.SQLAlchemyError):
                conn.exec_driver_sql("ROLLBACK")
            raise
        return rows

    def claim_sqlite(self, limit: int, lost_below: int) -> list[Any]:
        """Rows claimed by one statement: under SQLite's write lock it is race-free."""
        queues = self._params["queues"]
        params = {
            **self._params,
            "now": sqlite_text(utcnow()),
            "queues": json.dumps(queues),
            "names": json.dumps(self._params["names"]),
            "limit": limit,
            "lost_below": lost_below,
        }
        sql = SQLITE_LIMITED_CLAIM.format(
            queue_filter="" if queues is None else SQLITE_QUEUE_FILTER
        )
        with self._db.autocommit() as conn:
            return self._db.driver_execute(conn, sql, params)
