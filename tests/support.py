"""Helpers shared by the tests: backends, workers in threads and in processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import tasklet
from tasklet import _config, storage
from tasklet._database import Database
from tasklet.schema import jobs
from tasklet.worker import Worker, WorkerSettings

REPO = Path(__file__).resolve().parent.parent


class Backend:
    """A migrated, empty tasklet database that the test owns, and how to reach it."""

    def __init__(self, name: str, url: str, schema: str | None) -> None:
        self.name = name
        self.url = url
        self.schema = schema

    @property
    def env(self) -> dict[str, str]:
        """Environment for a subprocess (worker, CLI) that must use this database."""
        env = {**os.environ, "TASKLET_DATABASE_URL": self.url}
        if self.schema is not None:
            env["TASKLET_SCHEMA"] = self.schema
        else:
            env.pop("TASKLET_SCHEMA", None)
        return env

    @contextlib.contextmanager
    def connect(self) -> Iterator[sa.Connection]:
        """A plain connection (not tasklet's engine) that sees only this backend's tables."""
        engine = sa.create_engine(self.url)
        try:
            with engine.connect() as conn:
                if self.schema is not None:
                    conn.exec_driver_sql(f'SET search_path TO "{self.schema}"')
                    conn.commit()
                yield conn
        finally:
            engine.dispose()

    def table_names(self) -> set[str]:
        with self.connect() as conn:
            return set(sa.inspect(conn).get_table_names())

    def sqlite_create_statement(self, table: str) -> str:
        """The CREATE statement SQLite keeps for ``table`` (its CHECKs are in it)."""
        with self.connect() as conn:
            return str(
                conn.exec_driver_sql(
                    "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
                ).scalar_one()
            )

    def state_invariant_breaches(self) -> list[tuple[int, str, str | None]]:
        """Jobs that break a state invariant: (id, status, locked_by).

        A running job has a holder; a terminal job has ``finished_at``. SQLite's
        CHECKs hold these; on PostgreSQL they are not CHECKs (migration 0004), so
        the fixtures run this after every test instead.
        """
        with self.connect() as conn:
            if not sa.inspect(conn).has_table("jobs"):
                return []
            rows = conn.exec_driver_sql(
                "SELECT id, status, locked_by FROM jobs"
                " WHERE (status = 'running' AND locked_by IS NULL)"
                " OR (status IN ('succeeded', 'failed', 'cancelled') AND finished_at IS NULL)"
            )
            return [(row[0], row[1], row[2]) for row in rows]

    def configure(self) -> Database:
        tasklet.configure(self.url, schema=self.schema)
        return _config.database()

    def __repr__(self) -> str:
        return f"<Backend {self.name}>"


#: Worker settings for tests: short heartbeats and leases, so crash scenarios take seconds.
FAST = WorkerSettings(concurrency=4, heartbeat_s=0.2, lost_after_s=1.0, sweep_s=0.2, grace_s=5)


def drain(settings: WorkerSettings = FAST) -> Worker:
    """Run a worker in this thread until no job is due (``tasklet workoff``)."""
    worker = Worker(settings)
    worker.run_sync(drain=True)
    return worker


def runs(db: Database, job_id: int) -> list[tuple[int, str]]:
    """The job's attempts as (attempt, outcome), oldest first."""
    return [(r.attempt, r.outcome) for r in storage.job_runs_list(db, job_id)]


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll with a deadline (the thing awaited happens in another thread or process)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)


def wait_for_db(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """:func:`wait_for` a condition read from a database that may be restarting."""

    def tolerant() -> bool:
        try:
            return condition()
        except tasklet.TaskletError:
            return False

    wait_for(tolerant, timeout)


class BackgroundWorker:
    """A worker running in a thread, as a long-lived `tasklet worker` would."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.worker = Worker(settings)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run_sync()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Worker:
        self.thread.start()
        assert self.worker.started.wait(10), "worker did not start"
        return self.worker

    def __exit__(self, *_: object) -> None:
        self.worker.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "worker did not stop"
        if self.error is not None:
            raise self.error


class Log:
    """The append-only record the jobs write: one line per start or end of a run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self, event: str) -> list[tuple[int, int]]:
        if not self.path.exists():
            return []
        rows = [line.split() for line in self.path.read_text().splitlines()]
        return [(int(r[0]), int(r[1])) for r in rows if r[2] == event]

    def done_per_job(self) -> Counter[int]:
        return Counter(job_id for job_id, _ in self.lines("done"))


def tasklet_command(backend: Backend, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m tasklet ARGS` as a user runs it, on this backend's database; waits for it."""
    return subprocess.run(
        [sys.executable, "-m", "tasklet", *args],
        env=backend.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def tasklet_process(backend: Backend, log: Log, *args: str) -> subprocess.Popen[bytes]:
    """`python -m tasklet ARGS`, its output going to a file (a full pipe would block it)."""
    env = {**backend.env, "TASKLET_TEST_LOG": str(log.path), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "tasklet", *args, "--import", "tests.worker_jobs"]
    output = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed by finish)
        prefix="tasklet-process-", suffix=".log", dir=log.path.parent, delete=False
    )
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
    )
    _outputs[process.pid] = output
    return process


_outputs: dict[int, Any] = {}


def finish(process: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, str]:
    """Wait for the process; its exit code and everything it printed."""
    process.wait(timeout=timeout)
    output = _outputs.pop(process.pid, None)
    if output is None:
        return process.returncode, ""
    output.close()
    return process.returncode, Path(output.name).read_text(errors="replace")


def count_jobs(db: Database) -> int:
    """Rows in ``jobs`` as a separate, read-only connection sees them (never waits on SQLite)."""
    with db.begin(read_only=True) as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).select_from(jobs),
                execution_options=db.execution_options,
            ).scalar_one()
        )


def get_row(db: Database, job_id: int) -> storage.JobRow:
    row = storage.job_get(db, job_id)
    assert row is not None, f"job {job_id} is not in the jobs table"
    return row
