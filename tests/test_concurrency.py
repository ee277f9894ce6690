"""Concurrency limits: at most N attempts of a job type (or per key) run at once, anywhere."""

from __future__ import annotations

import datetime as dt
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import tasklet
from tasklet import JobDefinitionError, job, storage
from tasklet._database import Database
from tasklet.schema import workers
from tasklet.storage.limited import lock_space
from tasklet.worker import WorkerSettings
from tests import limited_jobs
from tests.support import (
    Backend,
    BackgroundWorker,
    Log,
    finish,
    get_row,
    tasklet_process,
    wait_for,
)


def claim(db: Database, names: list[str], limit: int = 10, **kwargs: Any) -> list[int]:
    claimed = storage.jobs_claim(
        db, worker_id="w", queues=None, names=names, limit=limit, limited=True, **kwargs
    )
    return [j.id for j in claimed]


def succeed(db: Database, job_ids: list[int]) -> None:
    """Finish running jobs as their worker would."""
    now = dt.datetime.now(dt.UTC)
    completions = []
    for job_id in job_ids:
        row = get_row(db, job_id)
        completions.append(
            storage.Completion(
                job_id=job_id,
                lease=row.lease,
                attempt=row.attempts,
                worker_id="w",
                status="succeeded",
                outcome="succeeded",
                started_at=row.started_at,
                finished_at=now,
            )
        )
    assert storage.jobs_finish(db, completions) == set(job_ids)


def most_at_once(path: Path) -> Counter[str]:
    """Replays the jobs' start and end lines: the most that ran at once, per key and overall."""
    running: Counter[str] = Counter()
    most: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        event = line.split()[2]
        kind, _, key = event.partition(":")
        for group in ("all", key) if key else ("all",):
            running[group] += 1 if kind == "start" else -1
            most[group] = max(most[group], running[group])
    return most


# ------------------------------------------------------------ declaring limits


def test_a_limited_job_is_stored_with_its_name_as_key_and_its_limit(db: Database) -> None:
    @job(name="t.limited", concurrency=2)
    def limited() -> None: ...

    row = get_row(db, limited.defer().id)

    assert (row.concurrency_key, row.concurrency_limit) == ("t.limited", 2)


def test_a_per_argument_limit_keys_each_job_by_that_arguments_value(db: Database) -> None:
    @job(name="t.sync", concurrency=1, concurrency_key="tenant")
    def sync(tenant: int, full: bool = False, region: str = "eu") -> None: ...

    one = sync.defer(5)
    many = sync.defer_many([{"tenant": 6}, {"tenant": 7, "full": True}])

    keys = [get_row(db, h.id).concurrency_key for h in [one, *many]]
    assert keys == ["t.sync:5", "t.sync:6", "t.sync:7"]


def test_a_key_argument_left_to_its_default_keys_by_the_default(db: Database) -> None:
    @job(name="t.region", concurrency=3, concurrency_key="region")
    def by_region(region: str = "eu") -> None: ...

    assert get_row(db, by_region.defer().id).concurrency_key == "t.region:eu"


def test_options_put_a_job_under_a_key_it_shares_with_other_job_types(db: Database) -> None:
    @job(name="t.export", concurrency=2)
    def export() -> None: ...

    @job(name="t.report", concurrency=2, concurrency_key="tenant")
    def report(tenant: int) -> None: ...

    first = export.options(concurrency_key="tenant:5").defer()
    second = report.options(concurrency_key="tenant:5").defer(tenant=5)

    assert {get_row(db, h.id).concurrency_key for h in (first, second)} == {"tenant:5"}


def test_a_job_without_a_limit_is_stored_unlimited(db: Database) -> None:
    @job(name="t.free")
    def free() -> None: ...

    row = get_row(db, free.defer().id)

    assert (row.concurrency_key, row.concurrency_limit) == (None, None)


def test_a_concurrency_key_option_on_a_job_without_a_limit_is_refused(db: Database) -> None:
    @job(name="t.free")
    def free() -> None: ...

    with pytest.raises(ValueError, match=r"declare t\.free with @job\(concurrency=N\)"):
        free.options(concurrency_key="tenant:5")


@pytest.mark.parametrize("key", ["", "a\x00b", 5])
def test_a_bad_concurrency_key_option_is_refused(db: Database, key: Any) -> None:
    @job(name="t.limited", concurrency=2)
    def limited() -> None: ...

    with pytest.raises(ValueError, match="concurrency_key must be a non-empty string"):
        limited.options(concurrency_key=key)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "an int >= 1, not 0"),
        ({"concurrency": True}, "an int >= 1, not True"),
        ({"concurrency": "2"}, "an int >= 1, not '2'"),
        ({"concurrency_key": "tenant"}, "pass concurrency=N too"),
        ({"concurrency": 2, "concurrency_key": "user"}, "must name a parameter of t.bad"),
    ],
)
def test_bad_concurrency_declarations_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(JobDefinitionError, match=message):

        @job(name="t.bad", **options)
        def bad(tenant: int) -> None: ...


def test_a_key_argument_that_cannot_form_a_key_is_refused_and_nothing_is_stored(
    db: Database,
) -> None:
    @job(name="t.sync", concurrency=1, concurrency_key="tenant")
    def sync(tenant: Any) -> None: ...

    with pytest.raises(TypeError, match=r"tenant=\{'id': 5\} is its concurrency key"):
        sync.defer_many([{"tenant": 4}, {"tenant": {"id": 5}}])
    assert storage.jobs_count(db) == {}


# -------------------------------------------------------------------- claims


def test_a_claim_takes_no_more_limited_jobs_than_their_limit(db: Database) -> None:
    @job(name="t.limited", concurrency=2)
    def limited(i: int) -> None: ...

    handles = limited.defer_many([{"i": i} for i in range(5)])

    assert claim(db, ["t.limited"]) == [h.id for h in handles[:2]]
    assert claim(db, ["t.limited"]) == []


def test_a_finished_limited_job_makes_room_for_the_next(db: Database) -> None:
    @job(name="t.limited", concurrency=2)
    def limited(i: int) -> None: ...

    handles = limited.defer_many([{"i": i} for i in range(5)])
    running = claim(db, ["t.limited"])
    succeed(db, running[:1])

    assert claim(db, ["t.limited"]) == [handles[2].id]


def test_each_key_has_its_own_limit(db: Database) -> None:
    @job(name="t.sync", concurrency=1, concurrency_key="tenant")
    def sync(tenant: str, i: int) -> None: ...

    a1, a2, b1 = sync.defer_many(
        [{"tenant": "a", "i": 1}, {"tenant": "a", "i": 2}, {"tenant": "b", "i": 1}]
    )

    assert claim(db, ["t.sync"]) == [a1.id, b1.id]
    assert get_row(db, a2.id).status == "queued"


def test_a_claimer_without_limits_leaves_limited_jobs_alone(db: Database) -> None:
    @job(name="t.limited", concurrency=2)
    def limited() -> None: ...

    @job(name="t.free")
    def free() -> None: ...

    limited.defer()
    unlimited = free.defer()

    claimed = storage.jobs_claim(
        db, worker_id="w", queues=None, names=["t.limited", "t.free"], limit=10
    )

    assert [j.id for j in claimed] == [unlimited.id]


def test_a_limited_claim_leaves_out_paused_queues(db: Database) -> None:
    @job(name="t.limited", queue="email", concurrency=2)
    def limited() -> None: ...

    limited.defer()
    tasklet.pause_queue("email")

    assert claim(db, ["t.limited"]) == []


def test_a_limited_claim_takes_only_its_queues_and_names(db: Database) -> None:
    @job(name="t.limited", queue="email", concurrency=2)
    def limited() -> None: ...

    mine = limited.defer()
    limited.options(queue="other").defer()
    claimed = storage.jobs_claim(
        db, worker_id="w", queues=["email"], names=["t.limited"], limit=10, limited=True
    )
    assert [j.id for j in claimed] == [mine.id]
    assert claim(db, ["t.unknown"]) == []


def test_limited_and_unlimited_jobs_share_the_free_slots(db: Database) -> None:
    @job(name="t.limited", concurrency=5)
    def limited(i: int) -> None: ...

    @job(name="t.free")
    def free(i: int) -> None: ...

    limited.defer_many([{"i": i} for i in range(5)])
    free.defer_many([{"i": i} for i in range(5)])
    claimer = storage.Claimer(
        db, worker_id="w", queues=None, names=["t.free", "t.limited"], limited=True
    )
    try:
        names = [Counter(j.name for j in claimer.claim(3)) for _ in range(2)]
    finally:
        claimer.close()

    # Each kind goes first in turn: neither can keep the other from the slots.
    assert names == [Counter({"t.limited": 3}), Counter({"t.free": 3})]


def test_claimers_racing_for_one_key_never_exceed_its_limit(db: Database) -> None:
    @job(name="t.limited", concurrency=3)
    def limited(i: int) -> None: ...

    limited.defer_many([{"i": i} for i in range(40)])
    claimed: list[int] = []
    start = threading.Barrier(8, timeout=10)

    def race() -> None:
        claimer = storage.Claimer(db, worker_id="w", queues=None, names=["t.limited"], limited=True)
        try:
            start.wait()
            for _ in range(5):
                claimed.extend(j.id for j in claimer.claim(2))
        finally:
            claimer.close()

    threads = [threading.Thread(target=race) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert len(claimed) == 3
    assert storage.jobs_count(db) == {"running": 3, "queued": 37}


def test_a_key_another_claimer_holds_is_skipped_until_it_lets_go(
    pg_backend: Backend, pg_db: Database
) -> None:
    @job(name="t.limited", concurrency=2)
    def limited(i: int) -> None: ...

    limited.defer_many([{"i": i} for i in range(3)])
    claimer = storage.Claimer(pg_db, worker_id="w", queues=None, names=["t.limited"], limited=True)
    try:
        with pg_backend.connect() as other, other.begin():
            lock = "SELECT pg_advisory_xact_lock(%(space)s, hashtext('t.limited'))"
            other.exec_driver_sql(lock, {"space": lock_space(pg_db.schema)})
            assert (claimer.claim(5), claimer.retry_soon) == ([], True)
        assert len(claimer.claim(5)) == 2
        assert not claimer.retry_soon
    finally:
        claimer.close()


def test_a_key_past_hundreds_of_others_is_reached_by_the_next_claim(db: Database) -> None:
    @job(name="t.other", concurrency=1, concurrency_key="i")
    def other(i: int) -> None: ...

    @job(name="t.sync", concurrency=1, concurrency_key="tenant")
    def sync(tenant: int) -> None: ...

    other.defer_many([{"i": i} for i in range(300)])  # keys "t.other:…" come first
    mine = sync.defer(tenant=1)
    claimer = storage.Claimer(db, worker_id="w", queues=None, names=["t.sync"], limited=True)
    try:
        first = claimer.claim(5)
        if not first:  # the scan stopped at its bound, and says so
            assert claimer.retry_soon
        claimed = first or claimer.claim(5)
    finally:
        claimer.close()

    assert [j.id for j in claimed] == [mine.id]


def test_next_due_skips_due_limited_jobs_but_not_scheduled_ones(db: Database) -> None:
    @job(name="t.limited", concurrency=1)
    def limited() -> None: ...

    limited.defer()  # due, but waits for room: a finish will wake the worker
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    limited.defer_at(later)

    due = storage.jobs_next_due(db, queues=None, names=["t.limited"], limited=True)

    assert due is not None and abs(due - later) < dt.timedelta(seconds=1)


# ------------------------------------------------------ a worker in this process


def test_unlimited_jobs_keep_flowing_while_limited_ones_wait(db: Database) -> None:
    release = threading.Event()

    @job(name="t.limited", concurrency=1)
    def limited(i: int) -> None:
        release.wait(10)

    @job(name="t.free")
    def free(i: int) -> None: ...

    blocked = limited.defer_many([{"i": i} for i in range(3)])
    with BackgroundWorker(WorkerSettings(concurrency=4, poll_s=0.05)):
        wait_for(lambda: get_row(db, blocked[0].id).status == "running")
        flowing = free.defer_many([{"i": i} for i in range(6)])
        wait_for(lambda: all(get_row(db, h.id).status == "succeeded" for h in flowing))
        assert [get_row(db, h.id).status for h in blocked] == ["running", "queued", "queued"]
        release.set()
        wait_for(lambda: storage.jobs_count(db) == {"succeeded": 9})


def test_a_finished_limited_job_starts_the_next_at_once(db: Database) -> None:
    releases = [threading.Event() for _ in range(2)]
    started: list[int] = []

    @job(name="t.limited", concurrency=1)
    def limited(i: int) -> None:
        started.append(i)
        releases[i].wait(10)

    limited.defer_many([{"i": 0}, {"i": 1}])
    with BackgroundWorker(WorkerSettings(concurrency=4, poll_s=60)) as worker:
        wait_for(lambda: started == [0])
        # A worker that just heard a notification keeps looking for a second: wait it out.
        wait_for(lambda: time.monotonic() > worker._hot_until)
        releases[0].set()
        # The poll is a minute away: only the finish can have started the next one.
        wait_for(lambda: started == [0, 1], timeout=10)
        releases[1].set()


# ------------------------------------------------------------ worker processes


def registered_workers(db: Database) -> int:
    with db.begin(read_only=True) as conn:
        query = sa.select(sa.func.count()).select_from(workers)
        return int(conn.execute(query, execution_options=db.execution_options).scalar_one())


def run_workers(
    backend: Backend, db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Three long-running workers, all taking jobs before the test defers any."""
    processes.extend(
        tasklet_process(
            backend, log, "worker", "-q", "work", "-c", "4", "--import", "tests.limited_jobs"
        )
        for _ in range(3)
    )
    wait_for(lambda: registered_workers(db) == 3)


def stop_workers(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    results = [finish(p) for p in processes]
    assert [code for code, _ in results] == [0, 0, 0], results


@pytest.mark.slow
def test_three_worker_processes_run_exactly_two_of_a_two_at_a_time_job_at_once(
    backend: Backend, db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    run_workers(backend, db, log, processes)
    limited_jobs.two_at_a_time.defer_many([{"seconds": 0.15}] * 12)
    wait_for(lambda: storage.jobs_count(db) == {"succeeded": 12})
    stop_workers(processes)
    assert most_at_once(log.path)["all"] == 2


@pytest.mark.slow
def test_worker_processes_hold_each_key_to_its_limit_and_run_keys_side_by_side(
    backend: Backend, db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    run_workers(backend, db, log, processes)
    limited_jobs.one_per_tenant.defer_many(
        [{"tenant": tenant, "seconds": 0.15} for tenant in "ab" for _ in range(4)]
    )
    wait_for(lambda: storage.jobs_count(db) == {"succeeded": 8})
    stop_workers(processes)
    most = most_at_once(log.path)
    assert (most["a"], most["b"], most["all"]) == (1, 1, 2)
