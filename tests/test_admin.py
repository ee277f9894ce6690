"""The admin commands (`status`, `jobs list|show|retry`, `workers`), run as a user runs them.

Every test calls `python -m tasklet ...` in a subprocess against a real
database it prepared through tasklet's storage operations.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import tasklet
from tasklet import storage
from tasklet._database import Database
from tasklet.schema import paused_queues, workers
from tasklet.storage import Completion, NewJob
from tasklet.worker import Worker, WorkerSettings
from tests.support import Backend, BackgroundWorker, get_row, wait_for
from tests.support import tasklet_command as cli

pytestmark = pytest.mark.slow  # every test here spawns processes


def cli_json(backend: Backend, *args: str) -> Any:
    result = cli(backend, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def add(
    db: Database, queue: str = "default", n: int = 1, name: str = "tests.admin", **fields: Any
) -> list[int]:
    job = {
        "name": name,
        "queue": queue,
        "priority": 0,
        "max_attempts": 3,
        "timeout": None,
        "serializer": "json",
        "args": {"n": 1},
        "args_pickle": None,
        **fields,
    }
    return storage.jobs_insert(db, [NewJob(**job) for _ in range(n)])


def claim(db: Database, queue: str = "default", n: int = 1) -> list[storage.ClaimedJob]:
    return storage.jobs_claim(db, worker_id="w-1", queues=[queue], names=["tests.admin"], limit=n)


def end(db: Database, jobs: list[storage.ClaimedJob], status: str, error: str = "") -> None:
    now = storage.utcnow()
    storage.jobs_finish(
        db,
        [
            Completion(
                job_id=j.id,
                lease=j.lease,
                attempt=j.attempts,
                worker_id="w-1",
                status=status,
                outcome="succeeded" if status == "succeeded" else "failed",
                started_at=now - dt.timedelta(seconds=1),
                finished_at=now,
                error=error or None,
                traceback=f"Traceback (most recent call last):\n  {error}" if error else None,
            )
            for j in jobs
        ],
    )


def failed(db: Database, queue: str = "default", n: int = 1, error: str = "E: boom") -> list[int]:
    """Jobs that used up their attempts (one attempt each, max_attempts 1)."""
    add(db, queue, n, max_attempts=1)
    claimed = claim(db, queue, n)
    end(db, claimed, "failed", error)
    return [j.id for j in claimed]


def register_worker(db: Database, worker_id: str, queues: list[str], concurrency: int = 4) -> None:
    storage.worker_register(
        db, worker_id=worker_id, host="host-a", pid=4242, queues=queues, concurrency=concurrency
    )


def execute(db: Database, statement: sa.Executable) -> None:
    with db.begin() as conn:
        conn.execute(statement, execution_options=db.execution_options)


# ------------------------------------------------------------------ status


def test_status_counts_each_queue_by_state_with_the_oldest_wait(
    db: Database, backend: Backend
) -> None:
    add(db, "default", 3)
    add(db, "default", 2, delay_s=3600)
    add(db, "email", 2)
    claim(db, "email", 1)
    failed(db, "reports", 2)

    document = cli_json(backend, "status")

    by_queue = {q["queue"]: q for q in document["queues"]}
    assert {
        q: (r["queued"], r["scheduled"], r["running"], r["failed"]) for q, r in by_queue.items()
    } == {
        "default": (3, 2, 0, 0),
        "email": (1, 0, 1, 0),
        "reports": (0, 0, 0, 2),
    }
    assert by_queue["default"]["oldest_waiting_s"] >= 0
    assert by_queue["reports"]["oldest_waiting_s"] is None


def test_status_counts_jobs_under_a_concurrency_limit_as_queued(
    db: Database, backend: Backend
) -> None:
    add(db, "default", 2, concurrency_key="account-1", concurrency_limit=1)

    document = cli_json(backend, "status")

    assert [(q["queue"], q["queued"]) for q in document["queues"]] == [("default", 2)]


def test_status_shows_paused_queues_and_the_live_workers_of_each_queue(
    db: Database, backend: Backend
) -> None:
    add(db, "default")
    add(db, "email")
    execute(db, sa.insert(paused_queues).values(queue="email", paused_at=storage.utcnow()))
    register_worker(db, "all-queues", [])
    register_worker(db, "email-only", ["email"])
    register_worker(db, "silent", ["email"])
    old = storage.utcnow() - dt.timedelta(minutes=5)
    execute(db, sa.update(workers).where(workers.c.id == "silent").values(heartbeat_at=old))

    document = cli_json(backend, "status")

    by_queue = {q["queue"]: q for q in document["queues"]}
    assert (by_queue["email"]["paused"], by_queue["email"]["workers"]) == (True, 2)
    assert (by_queue["default"]["paused"], by_queue["default"]["workers"]) == (False, 1)
    assert document["workers_alive"] == 2


def test_status_lists_a_queue_that_has_workers_but_no_jobs(db: Database, backend: Backend) -> None:
    register_worker(db, "w", ["email"])

    document = cli_json(backend, "status")

    assert [(q["queue"], q["queued"], q["workers"]) for q in document["queues"]] == [
        ("email", 0, 1)
    ]


def test_status_prints_a_table_of_queues_for_people(db: Database, backend: Backend) -> None:
    add(db, "default", 3)
    failed(db, "email", 1)

    result = cli(backend, "status")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:5] == ["default", "3", "0", "0", "0"] for line in lines), lines
    assert any(line.split()[:5] == ["email", "0", "0", "0", "1"] for line in lines), lines
    assert "0 workers alive" in result.stdout


# -------------------------------------------------------------------- jobs


def test_jobs_list_shows_the_newest_jobs_first(db: Database, backend: Backend) -> None:
    ids = add(db, "default", 5)

    document = cli_json(backend, "jobs", "list")

    assert [j["id"] for j in document["jobs"]] == ids[::-1]
    assert document["next_before"] is None


def test_jobs_list_pages_with_before(db: Database, backend: Backend) -> None:
    ids = add(db, "default", 5)

    first = cli_json(backend, "jobs", "list", "--limit", "2")
    second = cli_json(
        backend, "jobs", "list", "--limit", "2", "--before", str(first["next_before"])
    )

    assert [j["id"] for j in first["jobs"]] == [ids[4], ids[3]]
    assert [j["id"] for j in second["jobs"]] == [ids[2], ids[1]]


def test_jobs_list_of_a_finished_status_pages_by_finish_time(
    db: Database, backend: Backend
) -> None:
    add(db, "default", 3, max_attempts=1)
    first, second, third = claim(db, "default", 3)
    for job in (third, first, second):  # finished in this order
        end(db, [job], "failed", "E: boom")

    page = cli_json(backend, "jobs", "list", "--status", "failed", "--limit", "2")
    rest = cli_json(
        backend, "jobs", "list", "--status", "failed", "--before", str(page["next_before"])
    )

    assert [j["id"] for j in page["jobs"]] == [second.id, first.id]
    assert [j["id"] for j in rest["jobs"]] == [third.id]


def test_jobs_list_filters_by_queue_status_and_name(db: Database, backend: Backend) -> None:
    add(db, "default", 2)
    wanted = failed(db, "email", 2)
    add(db, "email", 1)
    add(db, "email", 1, name="tests.other")

    by_status = cli_json(backend, "jobs", "list", "--queue", "email", "--status", "failed")
    by_name = cli_json(backend, "jobs", "list", "--name", "tests.other")

    assert sorted(j["id"] for j in by_status["jobs"]) == wanted
    assert [(j["name"], j["queue"]) for j in by_name["jobs"]] == [("tests.other", "email")]


def test_jobs_list_refuses_an_unknown_status_naming_the_valid_ones(tmp_path: Path) -> None:
    result = cli(
        Backend("sqlite", f"sqlite:///{tmp_path / 'none.db'}", None),
        "jobs",
        "list",
        "--status",
        "done",
    )

    assert result.returncode == 2
    assert "succeeded" in result.stderr


def test_jobs_show_gives_columns_arguments_and_every_attempt(
    db: Database, backend: Backend
) -> None:
    [job_id] = add(db, "default", max_attempts=2, args={"user_id": 7})
    end(db, claim(db), "queued", "ValueError: first")
    end(db, claim(db), "failed", "ValueError: second")

    document = cli_json(backend, "jobs", "show", str(job_id))

    assert document["job"]["status"] == "failed"
    assert document["job"]["args"] == {"user_id": 7}
    assert [(r["attempt"], r["outcome"], r["error"]) for r in document["runs"]] == [
        (1, "failed", "ValueError: first"),
        (2, "failed", "ValueError: second"),
    ]
    assert document["runs"][1]["traceback"].startswith("Traceback")


def test_jobs_show_prints_the_traceback_of_each_attempt(db: Database, backend: Backend) -> None:
    [job_id] = failed(db, error="KeyError: 'plan'")

    result = cli(backend, "jobs", "show", str(job_id))

    assert result.returncode == 0, result.stderr
    assert "attempt 1: failed" in result.stdout
    assert "Traceback (most recent call last):" in result.stdout
    assert "KeyError: 'plan'" in result.stdout


def test_jobs_show_prints_the_result_of_a_successful_attempt(
    db: Database, backend: Backend
) -> None:
    [job_id] = add(db)
    [job] = claim(db)
    now = storage.utcnow()
    storage.jobs_finish(
        db,
        [
            Completion(
                job_id=job.id,
                lease=job.lease,
                attempt=job.attempts,
                worker_id="w-1",
                status="succeeded",
                outcome="succeeded",
                started_at=now,
                finished_at=now,
                result={"sent": 3},
            )
        ],
    )

    result = cli(backend, "jobs", "show", str(job_id))

    assert result.returncode == 0, result.stderr
    assert "attempt 1: succeeded" in result.stdout
    assert 'result: {"sent": 3}' in result.stdout


def test_jobs_show_gives_pickled_arguments_as_opaque(db: Database, backend: Backend) -> None:
    [job_id] = add(db, serializer="pickle", args=None, args_pickle=b"\x80\x05opaque")

    document = cli_json(backend, "jobs", "show", str(job_id))

    assert document["job"]["args"] is None
    assert "pickled, 8 bytes" in document["job"]["args_pickled"]


def test_jobs_show_of_a_missing_job_says_so(backend: Backend) -> None:
    result = cli(backend, "jobs", "show", "999")

    assert result.returncode == 1
    assert result.stderr == "tasklet: there is no job 999 (it may have been deleted by retention)\n"


# ------------------------------------------------------------------- retry


def test_retried_job_is_queued_due_now_with_another_attempt(db: Database, backend: Backend) -> None:
    [job_id] = failed(db)

    document = cli_json(backend, "jobs", "retry", str(job_id))

    row = get_row(db, job_id)
    assert document == {"retried": [job_id], "skipped": {}}
    assert (row.status, row.attempts, row.max_attempts, row.finished_at) == ("queued", 1, 2, None)
    assert row.run_at <= storage.utcnow()


def test_retried_job_runs_once_more_and_its_attempt_is_numbered_after_the_others(
    db: Database, backend: Backend
) -> None:
    @tasklet.job(name="tests.admin", max_attempts=1)
    def flaky(n: int) -> None: ...

    [job_id] = failed(db)
    assert cli(backend, "jobs", "retry", str(job_id)).returncode == 0

    Worker(WorkerSettings(concurrency=2, heartbeat_s=0.2, lost_after_s=1)).run_sync(drain=True)

    assert get_row(db, job_id).status == "succeeded"
    runs = [(r.attempt, r.outcome) for r in storage.job_runs_list(db, job_id)]
    assert runs == [(1, "failed"), (2, "succeeded")]


def test_retry_leaves_queued_and_running_jobs_alone(db: Database, backend: Backend) -> None:
    add(db)
    [running] = [j.id for j in claim(db)]
    [queued] = add(db)

    results = [cli(backend, "jobs", "retry", str(i)) for i in (queued, running)]

    assert [r.returncode for r in results] == [1, 1]
    assert results[1].stderr == f"tasklet: job {running} not retried: it is running\n"
    assert [get_row(db, i).status for i in (queued, running)] == ["queued", "running"]


def test_retry_puts_a_cancelled_job_back(db: Database, backend: Backend) -> None:
    add(db)
    claimed = claim(db)
    end(db, claimed, "cancelled")

    document = cli_json(backend, "jobs", "retry", str(claimed[0].id))

    assert document["retried"] == [claimed[0].id]
    assert get_row(db, claimed[0].id).status == "queued"


def test_retry_all_failed_of_a_queue_leaves_other_queues_and_cancelled_jobs(
    db: Database, backend: Backend
) -> None:
    email = failed(db, "email", 3)
    other = failed(db, "default", 1)
    add(db, "email")
    cancelled = claim(db, "email")
    end(db, cancelled, "cancelled")

    document = cli_json(backend, "jobs", "retry", "--all-failed", "--queue", "email")

    assert document["retried"] == email
    assert get_row(db, other[0]).status == "failed"
    assert get_row(db, cancelled[0].id).status == "cancelled"


def test_retry_skips_a_job_whose_unique_key_is_held_by_a_queued_job(
    db: Database, backend: Backend
) -> None:
    add(db, unique_key="invoice-1", max_attempts=1)
    first = claim(db)
    end(db, first, "failed", "E: once")
    [free] = failed(db)
    [holder] = add(db, unique_key="invoice-1")

    document = cli_json(backend, "jobs", "retry", "--all-failed")

    assert document["retried"] == [free]
    assert "unique key" in document["skipped"][str(first[0].id)]
    assert (get_row(db, first[0].id).status, get_row(db, holder).status) == ("failed", "queued")


def test_retry_without_an_id_or_all_failed_says_what_to_give(tmp_path: Path) -> None:
    result = cli(Backend("sqlite", f"sqlite:///{tmp_path / 'none.db'}", None), "jobs", "retry")

    assert result.returncode == 1
    assert "give a job ID or --all-failed" in result.stderr


def test_retry_wakes_a_listening_postgres_worker_at_once(
    pg_db: Database, pg_backend: Backend
) -> None:
    @tasklet.job(name="tests.admin", max_attempts=1)
    def later(n: int) -> None: ...

    [job_id] = failed(pg_db)
    # A poll far longer than the test: only the NOTIFY can start the job in time.
    settings = WorkerSettings(concurrency=2, poll_s=600, heartbeat_s=0.2, lost_after_s=1)
    with BackgroundWorker(settings) as worker:
        assert worker.listener is not None
        assert worker.listener.connected.wait(10)
        assert cli(pg_backend, "jobs", "retry", str(job_id)).returncode == 0
        wait_for(lambda: get_row(pg_db, job_id).status == "succeeded", timeout=10)


# ----------------------------------------------------------------- workers


def test_workers_lists_the_live_workers_with_their_queues(db: Database, backend: Backend) -> None:
    register_worker(db, "host-a:1:x", ["email", "default"], concurrency=8)
    register_worker(db, "host-a:2:y", [])
    register_worker(db, "gone", [])
    old = storage.utcnow() - dt.timedelta(minutes=5)
    execute(db, sa.update(workers).where(workers.c.id == "gone").values(heartbeat_at=old))

    document = cli_json(backend, "workers")

    shown = [
        (w["id"], w["queues"], w["concurrency"], w["host"], w["pid"]) for w in document["workers"]
    ]
    assert shown == [
        ("host-a:1:x", ["email", "default"], 8, "host-a", 4242),
        ("host-a:2:y", [], 4, "host-a", 4242),
    ]
    assert all(0 <= w["heartbeat_age_s"] < 60 for w in document["workers"])


def test_workers_prints_a_table_naming_all_queues(db: Database, backend: Backend) -> None:
    register_worker(db, "host-a:2:y", [])

    result = cli(backend, "workers")

    assert result.returncode == 0, result.stderr
    assert "host-a:2:y" in result.stdout
    assert "(all)" in result.stdout


def test_admin_commands_need_the_tables_and_say_so(empty_backend: Backend) -> None:
    result = cli(empty_backend, "status")

    assert result.returncode == 1
    assert "tasklet migrate" in result.stderr


# ------------------------------------------------------------------ cancel


def test_cancel_of_a_queued_job_means_it_never_runs(db: Database, backend: Backend) -> None:
    [queued] = add(db)

    result = cli(backend, "jobs", "cancel", str(queued))

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tasklet: job {queued} cancelled; it will not run\n"
    assert get_row(db, queued).status == "cancelled"


def test_cancel_of_a_running_job_asks_its_worker_to_stop_it(db: Database, backend: Backend) -> None:
    add(db)
    [running] = [j.id for j in claim(db)]

    document = cli_json(backend, "jobs", "cancel", str(running))

    assert document == {"id": running, "outcome": "requested"}
    row = get_row(db, running)
    assert (row.status, row.cancel_requested_at is not None) == ("running", True)


def test_cancel_of_a_finished_or_missing_job_changes_nothing_and_says_so(
    db: Database, backend: Backend
) -> None:
    add(db)
    claimed = claim(db)
    end(db, claimed, "succeeded")

    finished = cli(backend, "jobs", "cancel", str(claimed[0].id))
    missing = cli(backend, "jobs", "cancel", "424242")

    assert finished.returncode == 1
    assert finished.stderr == f"tasklet: job {claimed[0].id} had already ended; nothing changed\n"
    assert get_row(db, claimed[0].id).status == "succeeded"
    assert missing.returncode == 1
    assert "no job with id 424242" in missing.stderr
