"""Storage operations the worker relies on: claim, fenced finish, rescue, clear."""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import sqlalchemy as sa

from tasklet import Job, _config, job, storage
from tasklet._database import Database
from tasklet.schema import jobs, workers
from tasklet.storage import Completion, utcnow
from tasklet.storage._sql import SQLITE_CLAIM, SQLITE_QUEUES_WITH_WORK


@pytest.fixture
def noop() -> Job[..., None]:
    @job(name="s.noop")
    def noop(i: int = 0) -> None: ...

    return noop


def _register(db: Database, worker_id: str) -> None:
    storage.worker_register(
        db, worker_id=worker_id, host="test", pid=1, queues=["default"], concurrency=1
    )


def _age_worker(db: Database, worker_id: str, seconds: float) -> None:
    """Make a worker's last heartbeat ``seconds`` old, as if it had died then."""
    old = utcnow() - dt.timedelta(seconds=seconds)
    if db.dialect == "sqlite":
        old = old.replace(tzinfo=None)
    with db.begin() as conn:
        conn.execute(
            sa.update(workers).where(workers.c.id == worker_id).values(heartbeat_at=old),
            execution_options=db.execution_options,
        )


def _make_due(db: Database) -> None:
    """Every queued job due a second ago."""
    past = utcnow() - dt.timedelta(seconds=1)
    if db.dialect == "sqlite":
        past = past.replace(tzinfo=None)
    with db.begin() as conn:
        conn.execute(sa.update(jobs).values(run_at=past), execution_options=db.execution_options)


def _finish(row: storage.ClaimedJob, worker_id: str, status: str = "succeeded") -> Completion:
    now = utcnow()
    return Completion(
        job_id=row.id,
        lease=row.lease,
        attempt=row.attempts,
        worker_id=worker_id,
        status=status,
        outcome=status,
        started_at=now,
        finished_at=now,
        result={"ok": True},
    )


def _claim(db: Database, worker_id: str, limit: int = 10) -> list[storage.ClaimedJob]:
    return storage.jobs_claim(db, worker_id=worker_id, queues=None, names=["s.noop"], limit=limit)


def test_claim_takes_due_jobs_and_hands_out_a_new_lease(db: Database, noop: Job[..., None]) -> None:
    noop.defer_many([{"i": i} for i in range(3)])
    _register(db, "w1")

    claimed = _claim(db, "w1", limit=2)

    assert [(r.attempts, r.lease) for r in claimed] == [(1, 1), (1, 1)]
    rows = [storage.job_get(db, r.id) for r in claimed]
    assert [(r.status, r.locked_by) for r in rows if r] == [("running", "w1")] * 2
    assert len(_claim(db, "w1", limit=10)) == 1


def test_concurrent_claims_never_hand_out_a_job_twice(db: Database, noop: Job[..., None]) -> None:
    noop.defer_many([{"i": i} for i in range(300)])
    claimed: Counter[int] = Counter()
    lock = threading.Lock()

    def claimer(worker_id: str) -> None:
        _register(db, worker_id)
        while rows := _claim(db, worker_id, limit=7):
            with lock:
                claimed.update(r.id for r in rows)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert len(claimed) == 300
    assert [job_id for job_id, n in claimed.items() if n > 1] == []


def test_a_claim_of_every_queue_takes_the_best_jobs_of_all_queues(
    db: Database, noop: Job[..., None]
) -> None:
    low = noop.options(queue="a", priority=5).defer(i=1)
    noop.options(queue="b", priority=5).defer(i=2)
    urgent = noop.options(queue="c", priority=-1).defer(i=3)
    first_normal = noop.options(queue="b").defer(i=4)
    second_normal = noop.options(queue="a").defer(i=5)
    _register(db, "w1")

    claimed = _claim(db, "w1", limit=4)

    assert [r.id for r in claimed] == [urgent.id, first_normal.id, second_normal.id, low.id]


@pytest.mark.usefixtures("sqlite_only")
def test_sqlite_claim_of_every_queue_reads_the_claim_index_in_order() -> None:
    # Sorting the whole backlog on every claim made a claim's cost grow with the
    # queue (4.9 ms a claim with 20k jobs queued); the plan shows it cannot.
    db = _config.database()
    claim = SQLITE_CLAIM.format(queue_filter=SQLITE_QUEUES_WITH_WORK)
    params = {"worker_id": "w", "now": "", "names": "[]", "limit": 1, "lost_below": 3}
    with db.engine.connect() as conn:
        plan = [row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {claim}", params)]

    assert not [step for step in plan if step.startswith("SCAN jobs")], plan
    assert "SEARCH jobs USING INDEX ix_jobs_queue_priority_run_at_id (queue=?)" in plan


def test_finish_with_a_stale_lease_changes_nothing(db: Database, noop: Job[..., None]) -> None:
    handle = noop.defer()
    _register(db, "old")
    (stale,) = _claim(db, "old")
    _age_worker(db, "old", 120)
    assert [r.id for r in storage.jobs_rescue(db, lost_after_s=30, max_lost=3)] == [handle.id]
    _register(db, "new")
    (fresh,) = _claim(db, "new")

    assert storage.jobs_finish(db, [_finish(stale, "old", "failed")]) == set()
    assert storage.jobs_finish(db, [_finish(fresh, "new")]) == {handle.id}

    row = storage.job_get(db, handle.id)
    assert row is not None and row.status == "succeeded"
    outcomes = [(r.attempt, r.outcome, r.worker_id) for r in storage.job_runs_list(db, handle.id)]
    assert outcomes == [(1, "lost", "old"), (2, "succeeded", "new")]


def test_finish_writes_every_completion_of_a_batch_with_its_run(
    db: Database, noop: Job[..., None]
) -> None:
    noop.defer_many([{"i": i} for i in range(5)])
    _register(db, "w")
    rows = _claim(db, "w")

    applied = storage.jobs_finish(db, [_finish(r, "w") for r in rows])

    assert applied == {r.id for r in rows}
    assert all(len(storage.job_runs_list(db, r.id)) == 1 for r in rows)
    assert storage.jobs_count(db) == {"succeeded": 5}


def test_rescue_leaves_the_jobs_of_live_workers_alone(db: Database, noop: Job[..., None]) -> None:
    noop.defer()
    _register(db, "alive")
    _claim(db, "alive")

    assert storage.jobs_rescue(db, lost_after_s=30, max_lost=3) == []
    assert storage.jobs_count(db) == {"running": 1}


def test_a_job_lost_max_lost_times_is_failed_not_retried(
    db: Database, noop: Job[..., None]
) -> None:
    handle = noop.defer()
    for n in range(2):
        worker_id = f"crashing-{n}"
        _register(db, worker_id)
        assert len(_claim(db, worker_id)) == 1
        _age_worker(db, worker_id, 120)
        storage.jobs_rescue(db, lost_after_s=30, max_lost=2)

    row = storage.job_get(db, handle.id)
    assert row is not None
    assert (row.status, row.lost_count) == ("failed", 2)
    assert row.last_error is not None and "crashing-1" in row.last_error
    assert [r.outcome for r in storage.job_runs_list(db, handle.id)] == ["lost", "lost"]


def test_a_job_lost_again_comes_back_over_a_wider_window(
    db: Database, noop: Job[..., None]
) -> None:
    noop.defer_many([{"i": i} for i in range(200)])
    for n in range(2):
        _register(db, f"dead-{n}")
        while _claim(db, f"dead-{n}", limit=50):
            pass
        _age_worker(db, f"dead-{n}", 120)
        rescued_at = storage.utcnow()
        storage.jobs_rescue(db, lost_after_s=30, max_lost=3, spread_s=1.0)
        if n == 0:  # the first loss: back within one window
            delays = [(r.run_at - rescued_at).total_seconds() for r in storage.jobs_list(db)]
            assert max(delays) < 1.5
            _make_due(db)

    delays = [(r.run_at - rescued_at).total_seconds() for r in storage.jobs_list(db)]
    assert max(delays) > 1.0 and max(delays) < 2.5  # lost twice: over two windows


def test_many_sweepers_rescue_each_orphan_exactly_once(db: Database, noop: Job[..., None]) -> None:
    noop.defer_many([{"i": i} for i in range(200)])
    _register(db, "dead")
    while _claim(db, "dead", limit=50):
        pass
    _age_worker(db, "dead", 120)
    rescued: Counter[int] = Counter()
    lock = threading.Lock()

    def sweeper() -> None:
        lost = storage.jobs_rescue(db, lost_after_s=30, max_lost=3)
        with lock:
            rescued.update(r.id for r in lost)

    threads = [threading.Thread(target=sweeper) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert len(rescued) == 200 and max(rescued.values()) == 1
    assert storage.jobs_count(db) == {"queued": 200}


def test_clear_deletes_queued_jobs_of_the_given_queues_only(
    db: Database, noop: Job[..., None]
) -> None:
    noop.defer_many([{"i": 1}, {"i": 2}])
    noop.options(queue="keep").defer(i=3)

    assert storage.jobs_clear(db, queues=["default"]) == 2
    assert storage.jobs_count(db) == {"queued": 1}


_PLANS = (
    "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
    " WHERE statement LIKE '%%candidates%%'"
)


def test_a_claimer_plans_its_claim_once(pg_db: Database, noop: Job[..., None]) -> None:
    noop.defer_many([{"i": i} for i in range(20)])
    claimer = storage.Claimer(pg_db, worker_id="w1", queues=None, names=["s.noop"])
    try:
        for _ in range(10):  # psycopg prepares a statement from its fifth run
            claimer.claim(1)
        plans = claimer._connection().exec_driver_sql(_PLANS).all()
    finally:
        claimer.close()
    _assert_generic_only(plans)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_an_async_claimer_plans_its_claim_once(pg_db: Database, noop: Job[..., None]) -> None:
    noop.defer_many([{"i": i} for i in range(20)])
    claimer = storage.Claimer(pg_db, worker_id="w1", queues=None, names=["s.noop"])
    try:
        for _ in range(10):
            await claimer.claim_async(1)
        assert claimer._async_conn is not None
        plans = await pg_db.execute_on_async(claimer._async_conn, _PLANS.replace("%%", "%"), None)
    finally:
        await claimer.close_async()
    _assert_generic_only(plans)


def _assert_generic_only(plans: Sequence[Any]) -> None:
    """One prepared claim, run on its generic plan every time (never planned afresh)."""
    assert len(plans) == 1
    generic, custom = plans[0]
    assert generic > 0
    assert custom == 0


# -------------------------------------------------------------- one-row inserts

# A one-row insert binds only the values its row has (storage._sql.RowShape).
_OPTIONAL_VALUES: dict[str, dict[str, Any]] = {
    "timeout": {"timeout": 2.5},
    "unique_key": {"unique_key": "u-1"},
    "concurrency_key": {"concurrency_key": "c-1", "concurrency_limit": 2},
    "trace_context": {"trace_context": '{"traceparent":"00-ab-cd-01"}'},
}


def _new_job(**values: Any) -> storage.NewJob:
    fields: dict[str, Any] = {
        "name": "s.noop",
        "queue": "q",
        "priority": 3,
        "max_attempts": 4,
        "timeout": None,
        "serializer": "json",
        "args": {"i": 1},
        "args_pickle": None,
    }
    return storage.NewJob(**{**fields, **values})


@pytest.mark.parametrize("given", sorted(_OPTIONAL_VALUES))
def test_a_one_row_insert_stores_the_optional_values_it_is_given_and_no_other(
    db: Database, given: str
) -> None:
    (job_id,) = storage.jobs_insert(db, [_new_job(**_OPTIONAL_VALUES[given])])

    stored = storage.job_get(db, job_id)
    assert stored is not None
    expected = {c: None for values in _OPTIONAL_VALUES.values() for c in values}
    expected.update(_OPTIONAL_VALUES[given])
    assert {c: getattr(stored, c) for c in expected} == expected
    assert (stored.name, stored.queue, stored.priority, stored.max_attempts, stored.args) == (
        "s.noop",
        "q",
        3,
        4,
        {"i": 1},
    )


def test_a_one_row_insert_is_due_when_it_says(db: Database) -> None:
    at = utcnow().replace(microsecond=0) + dt.timedelta(hours=1)
    before = utcnow() - dt.timedelta(seconds=5)  # clocks of server and test may differ a little
    now_id, at_id, in_id = (
        storage.jobs_insert(db, [row])[0]
        for row in (_new_job(), _new_job(run_at=at), _new_job(delay_s=600.0))
    )
    after = utcnow() + dt.timedelta(seconds=5)

    def due(job_id: int) -> dt.datetime:
        stored = storage.job_get(db, job_id)
        assert stored is not None
        return stored.run_at

    assert before <= due(now_id) <= after
    assert due(at_id) == at
    assert before + dt.timedelta(seconds=600) <= due(in_id) <= after + dt.timedelta(seconds=600)


def test_a_one_row_insert_of_pickled_arguments_stores_the_bytes_only(db: Database) -> None:
    row = _new_job(serializer="pickle", args=None, args_pickle=b"\x80\x05K\x01.")
    (job_id,) = storage.jobs_insert(db, [row])

    stored = storage.job_get(db, job_id)
    assert stored is not None
    assert (stored.serializer, stored.args, stored.args_pickle) == (
        "pickle",
        None,
        b"\x80\x05K\x01.",
    )


def test_a_batch_of_one_job_type_is_written_in_one_statement_in_the_order_given(
    db: Database, noop: Job[..., None]
) -> None:
    rows = noop.new_rows(noop._options, [{"i": i} for i in range(50)])
    assert isinstance(rows, storage.NewJobBatch)

    ids = storage.jobs_insert(db, rows)

    assert ids == sorted(ids)
    stored = [storage.job_get(db, job_id) for job_id in ids]
    assert [s.args for s in stored if s is not None] == [{"i": i} for i in range(50)]


# ---------------------------------------------------------------- lost jobs


def _lose(db: Database, job_ids: Sequence[int], times: int) -> None:
    """Make these jobs look lost with a crashed worker ``times`` times."""
    with db.begin() as conn:
        conn.execute(
            sa.update(jobs).where(jobs.c.id.in_(job_ids)).values(lost_count=times),
            execution_options=db.execution_options,
        )


@pytest.mark.parametrize("limited", [False, True])
def test_a_claim_can_leave_out_jobs_lost_a_number_of_times(db: Database, limited: bool) -> None:
    @job(name="s.limited", concurrency=10)
    def limited_job(i: int = 0) -> None: ...

    @job(name="s.plain")
    def plain_job(i: int = 0) -> None: ...

    deferred = (limited_job if limited else plain_job).defer_many([{"i": i} for i in range(4)])
    _lose(db, [deferred[0].id], 2)
    _lose(db, [deferred[1].id], 1)
    claimer = storage.Claimer(
        db, worker_id="w1", queues=None, names=["s.limited", "s.plain"], limited=limited
    )
    try:
        claimed = claimer.claim(10, lost_below=2)
        rest = claimer.claim(10)
    finally:
        claimer.close()

    assert sorted((r.id, r.lost_count) for r in claimed) == [
        (deferred[1].id, 1),
        (deferred[2].id, 0),
        (deferred[3].id, 0),
    ]
    assert [(r.id, r.lost_count) for r in rest] == [(deferred[0].id, 2)]


def test_the_next_due_job_leaves_out_what_the_claim_left_out(
    db: Database, noop: Job[..., None]
) -> None:
    (handle,) = noop.defer_many([{"i": 1}])
    _lose(db, [handle.id], 2)

    assert storage.jobs_next_due(db, queues=None, names=["s.noop"], lost_below=2) is None
    assert storage.jobs_next_due(db, queues=None, names=["s.noop"]) is not None
