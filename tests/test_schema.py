"""The state invariants of a job row, and who holds them on each database (schema.py)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.support import Backend

_RUNNING_WITHOUT_HOLDER = (
    "INSERT INTO jobs (name, queue, priority, status, serializer, args, attempts, max_attempts,"
    " lost_count, run_at, created_at, lease) VALUES ('x', 'q', 0, 'running', 'json', '{}', 1, 1,"
    " 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 1)"
)


def test_a_running_job_without_a_holder_is_reported_by_the_invariant_check(
    backend: Backend,
) -> None:
    with backend.connect() as conn:
        if backend.name == "sqlite":  # past SQLite's CHECK, as a hand-written row would be
            conn.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
        conn.exec_driver_sql(_RUNNING_WITHOUT_HOLDER)
        conn.commit()

    breaches = backend.state_invariant_breaches()

    assert [(status, holder) for _, status, holder in breaches] == [("running", None)]
    with backend.connect() as conn:  # let the fixture's own check pass
        conn.exec_driver_sql("DELETE FROM jobs")
        conn.commit()


def test_sqlite_refuses_a_running_job_without_a_holder(sqlite_only: Backend) -> None:
    with sqlite_only.connect() as conn, pytest.raises(sa.exc.IntegrityError, match="running_held"):
        conn.exec_driver_sql(_RUNNING_WITHOUT_HOLDER)


def test_postgres_leaves_the_state_invariants_to_tasklet(pg_backend: Backend) -> None:
    with pg_backend.connect() as conn:
        checks = {c["name"] for c in sa.inspect(conn).get_check_constraints("jobs")}
    assert checks == set()


_JOB = (
    "INSERT INTO jobs (name, queue, priority, status, serializer, args, attempts, max_attempts,"
    " lost_count, run_at, created_at, lease) VALUES ('x', 'q', 0, {status}, {serializer}, '{{}}',"
    " 0, 1, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 0)"
)


@pytest.mark.parametrize(
    ("status", "serializer", "check"),
    [("'paused'", "'json'", "ck_jobs_status"), ("'queued'", "'yaml'", "ck_jobs_serializer")],
)
def test_sqlite_refuses_a_status_or_serializer_tasklet_does_not_know(
    sqlite_only: Backend, status: str, serializer: str, check: str
) -> None:
    with sqlite_only.connect() as conn, pytest.raises(sa.exc.IntegrityError, match=check):
        conn.exec_driver_sql(_JOB.format(status=status, serializer=serializer))


def test_sqlite_checks_on_jobs_hold_no_in_list(sqlite_only: Backend) -> None:
    # SQLite builds a temporary index of an IN list for every row written (migration 0005).
    assert " IN (" not in sqlite_only.sqlite_create_statement("jobs")
