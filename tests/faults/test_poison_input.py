"""Rows no job can run (written by hand, or by older code) never kill a worker or hold it up."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import tasklet
from tasklet import _config, job, storage
from tasklet._database import Database
from tasklet.schema import jobs
from tasklet.worker import Worker, WorkerSettings

pytestmark = pytest.mark.faults

GOOD = 1000


def insert_raw(db: Database, **values: Any) -> int:
    """A row written without tasklet's checks, as an operator's SQL or an old release might."""
    row = {
        "queue": "default",
        "priority": 0,
        "status": "queued",
        "serializer": "json",
        "args": {},
        "args_pickle": None,
        "attempts": 0,
        "max_attempts": 3,
        "lost_count": 0,
        "run_at": sa.func.now() if db.dialect == "postgresql" else storage.utcnow(),
        "created_at": sa.func.now() if db.dialect == "postgresql" else storage.utcnow(),
        "lease": 0,
        **values,
    }
    if db.dialect == "sqlite":
        for key in ("run_at", "created_at"):
            row[key] = row[key].replace(tzinfo=None)
    with db.begin() as conn:
        if db.dialect == "sqlite":  # PostgreSQL has no value CHECKs to get past (schema.py)
            conn.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
        try:
            result = conn.execute(
                sa.insert(jobs).values(**row).returning(jobs.c.id),
                execution_options=db.execution_options,
            )
            return int(result.scalar_one())
        finally:
            if db.dialect == "sqlite":
                conn.exec_driver_sql("PRAGMA ignore_check_constraints = OFF")


def test_bad_rows_fail_with_their_cause_and_every_good_job_runs_once(db: Database) -> None:
    runs: Counter[int] = Counter()

    @job(name="poison.good")
    async def good(n: int) -> None:
        runs[n] += 1

    @job(name="poison.strict", max_attempts=3)
    def strict(user_id: int) -> None: ...

    half = GOOD // 2
    good.defer_many([{"n": n} for n in range(half)])
    foreign_pickle = b"tasklet-pickle/2.7\n" + b"\x80\x02}q\x00."
    bad = {
        "wrong arguments": insert_raw(db, name="poison.strict", args={"account": 1}),
        "missing arguments": insert_raw(db, name="poison.strict", args={}),
        "not an object": insert_raw(db, name="poison.strict", args=[1, 2]),
        "undeclared pickle": insert_raw(
            db, name="poison.strict", serializer="pickle", args=None, args_pickle=foreign_pickle
        ),
        "bad tag": insert_raw(db, name="poison.strict", args={"user_id": {"__tasklet__": "?"}}),
    }
    unknown = insert_raw(db, name="poison.nobody_knows_me", args={})
    good.defer_many([{"n": n} for n in range(half, GOOD)])
    pid = os.getpid()

    Worker(WorkerSettings()).run_sync(drain=True)

    assert os.getpid() == pid
    assert sorted(runs) == list(range(GOOD)) and set(runs.values()) == {1}
    causes = {"wrong arguments": "do not fit", "missing arguments": "do not fit"}
    causes |= {"not an object": "not a JSON object", "undeclared pickle": "refuses to unpickle"}
    causes |= {"bad tag": "unknown payload tag"}
    for what, job_id in bad.items():
        row = storage.job_get(db, job_id)
        assert row is not None and row.status == "failed", what
        assert row.attempts == 1, f"{what}: a payload that cannot run is not retried"
        assert row.last_error is not None and causes[what] in row.last_error, (what, row.last_error)
    waiting = storage.job_get(db, unknown)
    assert waiting is not None and waiting.status == "queued"
    assert waiting.last_error is not None and "no running worker knows" in waiting.last_error


def test_a_serializer_tasklet_does_not_know_fails_the_job_without_running_it(
    db: Database,
) -> None:
    calls: list[int] = []

    @job(name="poison.yaml")
    def yaml_job(n: int = 0) -> None:
        calls.append(n)

    job_id = insert_raw(db, name="poison.yaml", serializer="yaml")

    Worker(WorkerSettings()).run_sync(drain=True)

    row = storage.job_get(db, job_id)
    assert row is not None and row.status == "failed" and row.attempts == 1
    assert row.last_error is not None and "serializer 'yaml'" in row.last_error
    assert calls == []


def test_sqlite_refuses_a_serializer_tasklet_does_not_know(tmp_path: Path) -> None:
    tasklet.configure(f"sqlite:///{tmp_path / 'checks.db'}")
    try:
        tasklet.upgrade()
        with _config.database().begin() as conn, pytest.raises(sa.exc.IntegrityError):
            conn.execute(
                sa.text(
                    "INSERT INTO jobs (name, queue, priority, status, serializer, args, attempts,"
                    " max_attempts, lost_count, run_at, created_at, lease) VALUES ('x', 'q', 0,"
                    " 'queued', 'yaml', '{}', 0, 1, 0, '2026-01-01', '2026-01-01', 0)"
                )
            )
    finally:
        tasklet.configure()
