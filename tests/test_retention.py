"""Retention: old finished jobs go with their runs, in bounded batches; the rest stays."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
import threading

import pytest
import sqlalchemy as sa

import tasklet
from tasklet import storage
from tasklet._database import Database
from tasklet.retention import Retention, parse_duration, prune_database
from tasklet.schema import job_runs, jobs
from tasklet.storage._sql import stamp
from tasklet.storage.retention import jobs_prune
from tasklet.worker import WorkerSettings
from tests.support import (
    REPO,
    Backend,
    BackgroundWorker,
    Log,
    count_jobs,
    finish,
    tasklet_process,
    wait_for,
)

DAY = 86400.0


def add_jobs(db: Database, status: str, *, age_s: float | None, n: int = 1) -> list[int]:
    """``n`` jobs in ``status``, finished ``age_s`` ago (None: not finished), with one run each."""
    new = storage.NewJob(
        name="r.job", queue="default", priority=0, max_attempts=1, timeout=None,
        serializer="json", args={}, args_pickle=None,
    )  # fmt: skip
    ids = storage.jobs_insert(db, [new] * n)
    finished = None if age_s is None else storage.utcnow() - dt.timedelta(seconds=age_s)
    with db.begin() as conn:
        opts = db.execution_options
        conn.execute(
            sa.update(jobs)
            .where(jobs.c.id.in_(ids))
            .values(
                status=status,
                finished_at=stamp(conn, finished),
                locked_by="w" if status == "running" else None,
            ),
            execution_options=opts,
        )
        runs = [
            {
                "job_id": i,
                "attempt": 1,
                "outcome": status if status in ("succeeded", "failed", "cancelled") else "failed",
                "finished_at": stamp(conn, finished or storage.utcnow()),
            }
            for i in ids
        ]
        conn.execute(sa.insert(job_runs), runs, execution_options=opts)
    return ids


def remaining(db: Database, table: sa.Table = jobs) -> set[int]:
    column = table.c.id if table is jobs else table.c.job_id
    with db.begin(read_only=True) as conn:
        return set(
            conn.execute(sa.select(column), execution_options=db.execution_options).scalars()
        )


# ------------------------------------------------------------------ the storage operation


def test_old_succeeded_jobs_are_deleted_and_recent_ones_stay(db: Database) -> None:
    old = add_jobs(db, "succeeded", age_s=2 * DAY, n=3)
    recent = add_jobs(db, "succeeded", age_s=60)

    assert jobs_prune(db, status="succeeded", older_than_s=DAY, limit=100) == 3
    assert remaining(db) == set(recent)
    assert not set(old) & remaining(db)


def test_runs_are_deleted_with_their_job(db: Database) -> None:
    old = add_jobs(db, "failed", age_s=2 * DAY, n=2)
    kept = add_jobs(db, "failed", age_s=60)

    jobs_prune(db, status="failed", older_than_s=DAY, limit=100)

    assert remaining(db, job_runs) == set(kept)
    assert not set(old) & remaining(db, job_runs)


def test_pruning_one_status_leaves_the_others(db: Database) -> None:
    add_jobs(db, "succeeded", age_s=2 * DAY)
    failed = add_jobs(db, "failed", age_s=2 * DAY)
    cancelled = add_jobs(db, "cancelled", age_s=2 * DAY)

    jobs_prune(db, status="succeeded", older_than_s=DAY, limit=100)

    assert remaining(db) == set(failed + cancelled)


def test_queued_and_running_jobs_are_never_pruned(db: Database) -> None:
    live = add_jobs(db, "queued", age_s=None) + add_jobs(db, "running", age_s=None)

    deleted = prune_database(db, Retention(succeeded=dt.timedelta(seconds=1)))

    assert deleted == {"succeeded": 0, "failed": 0, "cancelled": 0}
    assert remaining(db) == set(live)
    with pytest.raises(ValueError, match="only finished jobs"):
        jobs_prune(db, status="queued", older_than_s=0, limit=10)


def test_a_batch_deletes_at_most_its_limit_oldest_first(db: Database) -> None:
    ids = [add_jobs(db, "succeeded", age_s=(10 - i) * DAY)[0] for i in range(5)]

    assert jobs_prune(db, status="succeeded", older_than_s=DAY, limit=2) == 2

    assert remaining(db) == set(ids[2:])


def test_a_pass_works_through_every_batch(db: Database) -> None:
    add_jobs(db, "succeeded", age_s=2 * DAY, n=7)
    add_jobs(db, "failed", age_s=8 * DAY, n=3)
    add_jobs(db, "failed", age_s=2 * DAY)  # younger than the week failed jobs are kept

    deleted = prune_database(db, Retention(batch_size=2))

    assert deleted == {"succeeded": 7, "failed": 3, "cancelled": 0}
    assert count_jobs(db) == 1


def test_a_status_kept_forever_is_not_pruned(db: Database) -> None:
    kept = add_jobs(db, "cancelled", age_s=365 * DAY)

    deleted = prune_database(db, Retention(cancelled=None))

    assert deleted["cancelled"] == 0
    assert remaining(db) == set(kept)


def test_racing_pruners_delete_each_job_once(db: Database) -> None:
    add_jobs(db, "succeeded", age_s=2 * DAY, n=300)
    totals: list[int] = []
    barrier = threading.Barrier(4)

    def pruner() -> None:
        barrier.wait()
        totals.append(prune_database(db, Retention(batch_size=10))["succeeded"])

    threads = [threading.Thread(target=pruner) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert sum(totals) == 300 and len(totals) == 4
    assert count_jobs(db) == 0


def test_the_batch_is_found_on_the_retention_index(pg_db: Database) -> None:
    add_jobs(pg_db, "succeeded", age_s=2 * DAY, n=5)
    with pg_db.begin() as conn:
        conn.exec_driver_sql(f'SET LOCAL search_path TO "{pg_db.schema}"')
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        plan = "\n".join(
            row[0]
            for row in conn.exec_driver_sql(
                "EXPLAIN SELECT id FROM jobs WHERE status = 'succeeded' AND finished_at IS NOT "
                "NULL AND finished_at < now() - interval '1 day' ORDER BY finished_at LIMIT 1000 "
                "FOR UPDATE SKIP LOCKED"
            )
        )
    assert "ix_jobs_status_finished_at" in plan


# ------------------------------------------------------------------ public API and workers


def test_prune_uses_the_default_periods(db: Database) -> None:
    add_jobs(db, "succeeded", age_s=DAY + 60)
    kept = add_jobs(db, "failed", age_s=6 * DAY) + add_jobs(db, "cancelled", age_s=6 * DAY)
    add_jobs(db, "cancelled", age_s=7 * DAY + 60)

    assert tasklet.prune() == {"succeeded": 1, "failed": 0, "cancelled": 1}
    assert remaining(db) == set(kept)


@pytest.mark.anyio
async def test_prune_async_prunes_without_blocking_the_loop(db: Database) -> None:
    add_jobs(db, "succeeded", age_s=2 * DAY)

    assert (await tasklet.prune_async())["succeeded"] == 1


def test_a_running_worker_prunes_by_itself(db: Database) -> None:
    old = add_jobs(db, "succeeded", age_s=2 * DAY, n=5)
    recent = add_jobs(db, "succeeded", age_s=60)
    settings = WorkerSettings(
        heartbeat_s=0.2, lost_after_s=1.0, sweep_s=0.2,
        retention=Retention(every=dt.timedelta(seconds=0.2), batch_size=2),
    )  # fmt: skip

    with BackgroundWorker(settings):
        wait_for(lambda: remaining(db) == set(recent), timeout=10)

    assert not set(old) & remaining(db, job_runs)


def test_a_worker_told_not_to_prune_keeps_everything(db: Database) -> None:
    old = add_jobs(db, "succeeded", age_s=2 * DAY)
    settings = WorkerSettings(retention=Retention(every=None))

    with BackgroundWorker(settings) as worker:
        wait_for(worker.idle.is_set, timeout=10)
        assert not any(t.name == "tasklet-pruner" for t in threading.enumerate())

    assert remaining(db) == set(old)


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("12h", 43200), ("1d", DAY), ("2w", 14 * DAY), ("90", 90)],
)
def test_durations_are_written_with_a_unit(text: str, seconds: float) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


def test_forever_is_no_period() -> None:
    assert parse_duration("forever") is None
    assert parse_duration("never") is None


@pytest.mark.parametrize("text", ["", "0", "-1d", "1y", "soon"])
def test_a_duration_that_does_not_parse_says_how_to_write_one(text: str) -> None:
    with pytest.raises(ValueError, match=r"30s, 15m, 12h, 1d, 2w"):
        parse_duration(text)


def test_retention_refuses_periods_that_are_not_positive() -> None:
    with pytest.raises(ValueError, match="positive timedelta, or None"):
        Retention(succeeded=dt.timedelta(0))
    with pytest.raises(ValueError, match="at least 1"):
        Retention(batch_size=0)


# ------------------------------------------------------------------ the command line


def tasklet_cli(backend: Backend, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tasklet", *args]
    return subprocess.run(
        command, env=backend.env, cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_prune_command_deletes_by_the_default_periods_and_says_what_it_deleted(
    backend: Backend, db: Database
) -> None:
    add_jobs(db, "succeeded", age_s=2 * DAY, n=2)
    add_jobs(db, "failed", age_s=8 * DAY)
    kept = add_jobs(db, "failed", age_s=2 * DAY) + add_jobs(db, "queued", age_s=None)

    result = tasklet_cli(backend, "prune")

    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "tasklet: deleted 3 finished jobs and their runs: 2 succeeded (older than 1d), "
        "1 failed (older than 1w), 0 cancelled (older than 1w)\n"
    )
    assert remaining(db) == set(kept)


@pytest.mark.slow
def test_prune_command_takes_other_periods(backend: Backend, db: Database) -> None:
    add_jobs(db, "succeeded", age_s=2 * 3600)
    kept = add_jobs(db, "failed", age_s=30 * DAY)

    result = tasklet_cli(backend, "prune", "--keep-succeeded", "1h", "--keep-failed", "forever")

    assert result.returncode == 0, result.stderr
    assert "1 succeeded (older than 1h)" in result.stdout
    assert "failed kept forever" in result.stdout
    assert remaining(db) == set(kept)


@pytest.mark.slow
def test_a_period_that_does_not_parse_is_refused_before_anything_is_deleted(
    backend: Backend, db: Database
) -> None:
    kept = add_jobs(db, "succeeded", age_s=2 * DAY)

    result = tasklet_cli(backend, "prune", "--keep-succeeded", "1 year")

    assert result.returncode == 2
    assert "--keep-succeeded: '1 year' is not a duration" in result.stderr
    assert remaining(db) == set(kept)


@pytest.mark.slow
def test_worker_command_prunes_with_the_periods_it_is_given(
    backend: Backend, db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    old = add_jobs(db, "succeeded", age_s=2 * 3600)
    kept = add_jobs(db, "succeeded", age_s=60)

    worker = tasklet_process(backend, log, "worker", "--keep-succeeded", "1h")
    processes.append(worker)
    wait_for(lambda: remaining(db) == set(kept), timeout=30)
    worker.send_signal(signal.SIGTERM)

    assert finish(worker)[0] == 0
    assert not set(old) & remaining(db, job_runs)
