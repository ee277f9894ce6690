"""The dashboard's storage operations: counts, throughput, keyset pages, actions."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

import tasklet
from tasklet import storage
from tasklet._database import Database
from tasklet.dashboard import _control
from tasklet.errors import TaskletError
from tasklet.schema import jobs
from tasklet.storage import Completion, NewJob, utcnow
from tasklet.storage import dashboard as store
from tests.support import get_row

DAY = dt.timedelta(hours=24)


def _insert(
    db: Database, n: int = 1, *, queue: str = "default", name: str = "d.job", **options: Any
) -> list[int]:
    new = NewJob(
        name=name,
        queue=queue,
        priority=0,
        max_attempts=options.pop("max_attempts", 3),
        timeout=None,
        serializer="json",
        args={"i": 0},
        args_pickle=None,
        **options,
    )
    return storage.jobs_insert(db, [new] * n)


def _run(db: Database, names: list[str], outcome: str, limit: int = 100) -> list[int]:
    """Claim due jobs of these names and finish them with ``outcome`` (succeeded or failed)."""
    storage.worker_register(db, worker_id="w", host="h", pid=1, queues=[], concurrency=1)
    claimed = storage.jobs_claim(db, worker_id="w", queues=None, names=names, limit=limit)
    now = utcnow()
    storage.jobs_finish(
        db,
        [
            Completion(
                job_id=c.id,
                lease=c.lease,
                attempt=c.attempts,
                worker_id="w",
                status=outcome,
                outcome=outcome,
                started_at=now,
                finished_at=now,
                error=None if outcome == "succeeded" else "ValueError: boom",
            )
            for c in claimed
        ],
    )
    storage.worker_unregister(db, "w")
    return [c.id for c in claimed]


def _set(db: Database, ids: list[int], **values: Any) -> None:
    """Rewrite columns directly, to place jobs in time (SQLite stores naive UTC)."""
    if db.dialect == "sqlite":
        values = {
            k: v.replace(tzinfo=None) if isinstance(v, dt.datetime) else v
            for k, v in values.items()
        }
    with db.begin() as conn:
        conn.execute(
            sa.update(jobs).where(jobs.c.id.in_(ids)).values(**values),
            execution_options=db.execution_options,
        )


def _counts(db: Database) -> dict[str, tuple[int, int, int, int, int]]:
    return {
        q.queue: (q.queued, q.scheduled, q.running, q.failed, q.succeeded)
        for q in store.dashboard_queues(db, window=DAY)
    }


# ------------------------------------------------------------------ queues


def test_queue_counts_split_due_from_scheduled_and_count_running_failed_and_succeeded(
    db: Database,
) -> None:
    _insert(db, 2, queue="mail", name="d.ok")
    _run(db, ["d.ok"], "succeeded")
    _insert(db, 1, queue="mail", name="d.bad")
    _run(db, ["d.bad"], "failed")
    _insert(db, 3, queue="mail")
    _insert(db, 2, queue="mail", delay_s=3600)
    _insert(db, 1, queue="mail", concurrency_key="k", concurrency_limit=1)
    _insert(db, 1, queue="reports", name="d.slow")
    storage.worker_register(db, worker_id="busy", host="h", pid=1, queues=[], concurrency=1)
    storage.jobs_claim(db, worker_id="busy", queues=None, names=["d.slow"], limit=1)

    assert _counts(db) == {"mail": (4, 2, 0, 1, 2), "reports": (0, 0, 1, 0, 0)}


def test_succeeded_jobs_finished_before_the_window_are_not_counted(db: Database) -> None:
    old, _recent = _insert(db, 2, name="d.ok")
    _run(db, ["d.ok"], "succeeded")
    _set(db, [old], finished_at=utcnow() - dt.timedelta(hours=25))

    assert _counts(db) == {"default": (0, 0, 0, 0, 1)}


def test_a_paused_queue_is_listed_with_its_pause_time_even_when_empty(db: Database) -> None:
    tasklet.pause_queue("idle")
    tasklet.pause_queue("idle")  # a second pause changes nothing

    (queue,) = store.dashboard_queues(db, window=DAY)
    assert (queue.queue, queue.queued) == ("idle", 0)
    assert queue.paused_at is not None
    assert abs((utcnow() - queue.paused_at).total_seconds()) < 60


def test_resume_removes_the_pause(db: Database) -> None:
    _insert(db, 1, queue="mail")
    tasklet.pause_queue("mail")
    tasklet.resume_queue("mail")

    assert [q.paused_at for q in store.dashboard_queues(db, window=DAY)] == [None]


# ------------------------------------------------------------------ throughput


def test_throughput_counts_finished_jobs_per_queue_and_minute(db: Database) -> None:
    mail = _insert(db, 3, queue="mail", name="d.mail")
    _run(db, ["d.mail"], "succeeded")
    reports = _insert(db, 2, queue="reports", name="d.report")
    _run(db, ["d.report"], "failed")
    _set(db, mail[:1], finished_at=utcnow() - dt.timedelta(minutes=10))
    _set(db, reports, finished_at=utcnow() - dt.timedelta(hours=2))  # outside the hour

    chart = store.dashboard_throughput(db, buckets=60, bucket=dt.timedelta(minutes=1))

    assert list(chart.series) == ["mail"]
    counts = chart.series["mail"]
    assert (len(counts), sum(counts), counts[-1] + counts[-2]) == (60, 3, 2)
    assert counts[-11] + counts[-10] == 1
    assert chart.start <= utcnow() - dt.timedelta(minutes=59) < chart.start + chart.bucket


# ------------------------------------------------------------------ job pages


def test_job_pages_are_newest_first_and_page_by_id(db: Database) -> None:
    ids = _insert(db, 7)

    first = store.dashboard_jobs_page(db, limit=3)
    second = store.dashboard_jobs_page(db, before=first.jobs[-1].id, limit=3)
    last = store.dashboard_jobs_page(db, before=second.jobs[-1].id, limit=3)
    back = store.dashboard_jobs_page(db, after=last.jobs[0].id, limit=3)

    assert [j.id for j in first.jobs] == ids[::-1][:3]
    assert (first.has_newer, first.has_older) == (False, True)
    assert [j.id for j in second.jobs] == ids[::-1][3:6]
    assert ([j.id for j in last.jobs], last.has_older) == ([ids[0]], False)
    assert back == second


def test_job_pages_filter_by_queue_status_and_name(db: Database) -> None:
    _insert(db, 2, queue="mail", name="d.mail")
    (failed,) = _insert(db, 1, queue="mail", name="d.bad")
    _run(db, ["d.bad"], "failed")
    _insert(db, 2, queue="reports", name="d.mail")

    def ids(**filters: Any) -> list[int]:
        return [j.id for j in store.dashboard_jobs_page(db, **filters).jobs]

    assert ids(queue="mail", status="failed") == [failed]
    assert len(ids(name="d.mail")) == 4
    assert len(ids(queue="reports", name="d.mail", status="queued")) == 2
    (row,) = store.dashboard_jobs_page(db, status="failed").jobs
    assert (row.name, row.attempts, row.last_error) == ("d.bad", 1, "ValueError: boom")


def test_queued_means_due_and_scheduled_means_due_later(db: Database) -> None:
    (due,) = _insert(db, 1)
    (later,) = _insert(db, 1, delay_s=600)

    assert [j.id for j in store.dashboard_jobs_page(db, status="queued").jobs] == [due]
    assert [j.id for j in store.dashboard_jobs_page(db, status="scheduled").jobs] == [later]


def test_an_unknown_status_filter_is_refused_naming_the_valid_ones(db: Database) -> None:
    with pytest.raises(TaskletError, match="use one of queued, scheduled, running"):
        store.dashboard_jobs_page(db, status="done")


# ------------------------------------------------------------------ actions


def test_retry_puts_a_failed_job_back_due_now_with_one_more_attempt(db: Database) -> None:
    (job_id,) = _insert(db, 1, name="d.bad", max_attempts=1)
    _run(db, ["d.bad"], "failed")

    assert _control.retry_job(job_id) is True

    row = get_row(db, job_id)
    assert (row.status, row.attempts, row.max_attempts, row.finished_at) == ("queued", 1, 2, None)
    assert row.run_at <= utcnow()
    assert [r.outcome for r in storage.job_runs_list(db, job_id)] == ["failed"]  # history kept


def test_retry_leaves_jobs_that_are_not_failed_or_cancelled_alone(db: Database) -> None:
    (queued,) = _insert(db, 1, delay_s=600)

    assert _control.retry_job(queued) is False
    assert get_row(db, queued).run_at > utcnow()


def test_retry_of_a_job_whose_unique_key_is_taken_says_why(db: Database) -> None:
    (first,) = _insert(db, 1, name="d.bad", unique_key="report-7")
    assert _control.cancel_job(first) == "cancelled"
    _insert(db, 1, unique_key="report-7")

    with pytest.raises(TaskletError, match="unique key is held by a queued or running job"):
        _control.retry_job(first)
    assert get_row(db, first).status == "cancelled"


def test_cancel_finishes_a_queued_job_as_cancelled(db: Database) -> None:
    (job_id,) = _insert(db, 1)

    assert _control.cancel_job(job_id) == "cancelled"
    row = get_row(db, job_id)
    assert (row.status, row.finished_at is not None) == ("cancelled", True)
    assert _control.cancel_job(job_id) == "not_cancellable"


def test_a_cancel_request_marks_a_running_job(db: Database) -> None:
    (job_id,) = _insert(db, 1, name="d.slow")
    storage.worker_register(db, worker_id="busy", host="h", pid=1, queues=[], concurrency=1)
    storage.jobs_claim(db, worker_id="busy", queues=None, names=["d.slow"], limit=1)

    assert _control.cancel_job(job_id) == "cancel_requested"
    row = get_row(db, job_id)
    assert (row.status, row.cancel_requested_at is not None) == ("running", True)
    assert _control.cancel_job(424242) == "not_cancellable"


def test_workers_are_listed_with_the_jobs_they_hold(db: Database) -> None:
    _insert(db, 3, name="d.slow")
    storage.worker_register(db, worker_id="a", host="h1", pid=7, queues=["x"], concurrency=8)
    storage.worker_register(db, worker_id="b", host="h2", pid=9, queues=[], concurrency=2)
    storage.jobs_claim(db, worker_id="a", queues=None, names=["d.slow"], limit=2)

    listed = store.dashboard_workers(db)
    found = {w.id: (w.host, w.pid, w.queues, w.running, w.concurrency) for w in listed}
    assert found == {"a": ("h1", 7, ["x"], 2, 8), "b": ("h2", 9, [], 0, 2)}
    assert all(w.heartbeat_age_s < 60 for w in listed)


# ------------------------------------------------------------------ a million finished jobs

_MILLION = 1_000_000


@pytest.fixture
def million_finished(pg_db: Database) -> Database:
    """One INSERT ... SELECT generate_series: finished jobs over ~23 days, a few failed."""
    schema = pg_db.schema
    with pg_db.begin() as conn:
        conn.exec_driver_sql(
            f"""
            INSERT INTO "{schema}".jobs (name, queue, priority, status, serializer, args,
                attempts, max_attempts, lost_count, run_at, created_at, started_at,
                finished_at, lease)
            SELECT 'bulk.job_' || mod(g, 10), 'queue_' || mod(g, 4), 0,
                   CASE WHEN mod(g, 1000) = 0 THEN 'failed' ELSE 'succeeded' END, 'json',
                   '{{"i": 1}}'::jsonb, 1, 1, 0, t, t, t, t, 1
            FROM generate_series(1, {_MILLION}) AS g,
                 LATERAL (SELECT now() - ({_MILLION} - g) * interval '2 seconds' AS t) AS at
            """
        )
        conn.exec_driver_sql(f'ANALYZE "{schema}".jobs')
    _insert(pg_db, 5, queue="queue_1")
    return pg_db


@pytest.fixture
def statements(million_finished: Database) -> Iterator[list[tuple[str, Any]]]:
    """The SQL the dashboard sends, captured as the driver receives it."""
    seen: list[tuple[str, Any]] = []

    def capture(_c: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if re.search(r"\bjobs\b", statement):
            seen.append((statement, params))

    sa.event.listen(million_finished.engine, "before_cursor_execute", capture)
    yield seen
    sa.event.remove(million_finished.engine, "before_cursor_execute", capture)


def _plan_nodes(db: Database, statement: str, params: Any) -> list[dict[str, Any]]:
    with db.begin(read_only=True) as conn:
        raw = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", params).scalar_one()
    plan = raw if isinstance(raw, list) else json.loads(raw)
    nodes, todo = [], [plan[0]["Plan"]]
    while todo:
        node = todo.pop()
        nodes.append(node)
        todo.extend(node.get("Plans", []))
    return nodes


PAGE_FILTERS: list[dict[str, Any]] = [
    {},
    {"before": _MILLION // 2},
    {"status": "succeeded"},
    {"status": "failed"},
    {"status": "queued"},
    {"queue": "queue_3", "before": 4000},
    {"name": "bulk.job_7", "status": "succeeded"},
]


@pytest.mark.postgres
def test_job_pages_over_a_million_finished_jobs_read_an_index_not_the_table(
    million_finished: Database, statements: list[tuple[str, Any]]
) -> None:
    for filters in PAGE_FILTERS:
        statements.clear()
        page = store.dashboard_jobs_page(million_finished, limit=50, **filters)

        assert page.jobs, filters
        ((statement, params),) = statements
        kinds = [n["Node Type"] for n in _plan_nodes(million_finished, statement, params)]
        assert kinds[0] == "Limit", (filters, kinds)
        assert "Seq Scan" not in kinds, (filters, kinds)
        assert {"Index Scan", "Index Only Scan", "Bitmap Index Scan"} & set(kinds), (filters, kinds)


@pytest.mark.postgres
def test_queue_counts_over_a_million_finished_jobs_read_indexes_not_the_table(
    million_finished: Database, statements: list[tuple[str, Any]]
) -> None:
    counts = {q.queue: q for q in store.dashboard_queues(million_finished, window=DAY)}
    store.dashboard_throughput(million_finished, buckets=60, bucket=dt.timedelta(minutes=1))

    assert counts["queue_1"].queued == 5
    assert sum(q.failed for q in counts.values()) == _MILLION // 1000
    assert 40_000 < sum(q.succeeded for q in counts.values()) < 45_000  # the last 24 h only
    for statement, params in list(statements):  # (EXPLAIN itself is captured too)
        kinds = [n["Node Type"] for n in _plan_nodes(million_finished, statement, params)]
        assert "Seq Scan" not in kinds, (statement, kinds)
