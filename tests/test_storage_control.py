"""storage.control and the finish/rescue rules for cancel requests, on both databases."""

from __future__ import annotations

import psycopg

from tasklet import job, storage
from tasklet._database import Database
from tests.support import get_row


@job(name="t.control.work")
def work() -> None: ...


def claimed(db: Database, worker_id: str = "w1") -> storage.ClaimedJob:
    work.defer()
    (row,) = storage.jobs_claim(
        db, worker_id=worker_id, queues=None, names=["t.control.work"], limit=1
    )
    return row


def completion(row: storage.ClaimedJob, status: str, outcome: str) -> storage.Completion:
    return storage.Completion(
        job_id=row.id,
        lease=row.lease,
        attempt=row.attempts,
        worker_id="w1",
        status=status,
        outcome=outcome,
        started_at=storage.utcnow(),
        finished_at=storage.utcnow(),
        error="boom" if outcome == "failed" else None,
    )


def test_cancel_of_a_running_job_stores_the_request_and_leaves_it_running(db: Database) -> None:
    row = claimed(db)
    assert storage.job_cancel(db, row.id) == "requested"
    stored = get_row(db, row.id)
    assert (stored.status, stored.finished_at) == ("running", None)
    assert stored.cancel_requested_at is not None


def test_cancel_results_name_what_happened(db: Database) -> None:
    queued = work.defer()
    assert storage.job_cancel(db, queued.id) == "cancelled"
    assert storage.job_cancel(db, queued.id) == "finished"
    assert storage.job_cancel(db, 987654) == "missing"


def test_finish_turns_a_would_be_retry_of_a_cancel_requested_job_into_cancelled(
    db: Database,
) -> None:
    row = claimed(db)
    storage.job_cancel(db, row.id)
    assert storage.jobs_finish(db, [completion(row, "queued", "failed")]) == {row.id}

    stored = get_row(db, row.id)
    assert (stored.status, stored.locked_by) == ("cancelled", None)
    assert stored.finished_at is not None
    assert [r.outcome for r in storage.job_runs_list(db, row.id)] == ["failed"]


def test_finish_keeps_the_success_of_a_cancel_requested_job(db: Database) -> None:
    row = claimed(db)
    storage.job_cancel(db, row.id)
    storage.jobs_finish(db, [completion(row, "succeeded", "succeeded")])
    assert get_row(db, row.id).status == "succeeded"


def test_finish_retries_a_job_without_a_cancel_request_as_before(db: Database) -> None:
    row = claimed(db)
    storage.jobs_finish(db, [completion(row, "queued", "failed")])
    stored = get_row(db, row.id)
    assert (stored.status, stored.finished_at) == ("queued", None)


def test_rescue_of_a_lost_cancel_requested_job_cancels_it(db: Database) -> None:
    row = claimed(db, worker_id="gone")  # no heartbeat at all: lost
    storage.job_cancel(db, row.id)
    (lost,) = storage.jobs_rescue(db, lost_after_s=30, max_lost=3)

    stored = get_row(db, lost.id)
    assert (stored.status, stored.locked_by) == ("cancelled", None)
    assert stored.finished_at is not None
    assert [r.outcome for r in storage.job_runs_list(db, row.id)] == ["lost"]


def test_cancel_requests_are_listed_for_the_worker_holding_the_job_only(db: Database) -> None:
    mine, other, untouched = claimed(db, "w1"), claimed(db, "w2"), claimed(db, "w1")
    storage.job_cancel(db, mine.id)
    storage.job_cancel(db, other.id)
    assert storage.jobs_cancel_requested(db, "w1") == [mine.id]
    assert untouched.id not in storage.jobs_cancel_requested(db, "w1")


def test_cancel_of_a_running_job_notifies_the_control_channel(pg_db: Database) -> None:
    row = claimed(pg_db)
    with psycopg.connect(pg_db.conninfo, autocommit=True) as listener:
        listener.execute(f'LISTEN "{storage.control_channel(pg_db)}"')
        storage.job_cancel(pg_db, row.id)
        notices = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert notices == [f"cancel:{row.id}"]
