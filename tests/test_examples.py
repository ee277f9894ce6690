"""The examples in examples/, run as a user runs them: real servers, scripts and Alembic.

Each runs on a fresh SQLite file and on a fresh PostgreSQL schema (the app's
tables and tasklet's share it, through the connection's search_path).
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from tasklet.migrations import script_location
from tasklet.schema import TABLE_NAMES, VERSION_TABLE
from tests.conftest import POSTGRES_URL
from tests.support import REPO, wait_for

pytestmark = pytest.mark.slow

EXAMPLES = REPO / "examples"
BIN = Path(sys.executable).parent


@dataclass
class ExampleDatabase:
    url: str
    env: dict[str, str]

    def query(self, sql: str) -> list[Any]:
        engine = sa.create_engine(self.url)
        try:
            with engine.connect() as conn:
                return list(conn.exec_driver_sql(sql).all())
        finally:
            engine.dispose()

    def statuses(self) -> dict[str, int]:
        return dict(self.query("SELECT status, count(*) FROM jobs GROUP BY status"))


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ExampleDatabase]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKLET_")}
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'app.db'}"
    else:
        schema = request.getfixturevalue("fresh_schema")
        engine = sa.create_engine(POSTGRES_URL)
        with engine.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        engine.dispose()
        url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    yield ExampleDatabase(url, {**env, "TASKLET_DATABASE_URL": url, "PYTHONUNBUFFERED": "1"})


class Process:
    """A program of an example, its output going to a file (a full pipe would block it)."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._output: IO[bytes] = log.open("wb")
        self.popen = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=self._output, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> bool:
        """SIGTERM, as a supervisor stops a service; whether it exited cleanly.

        uvicorn re-raises the signal once its shutdown is complete, so dying of
        that SIGTERM after a clean shutdown counts as clean.
        """
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout)
        finally:
            self._output.close()
        return code == 0 or (code == -signal.SIGTERM and "shutdown complete" in self.output())

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._output.close()


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -------------------------------------------------------------- the signup apps

SERVERS = {
    "fastapi": lambda port: [str(BIN / "uvicorn"), "signup.fastapi_app:app", "--port", str(port)],
    "flask": lambda port: [sys.executable, "-m", "signup.flask_app", "--port", str(port)],
}


@pytest.fixture(params=sorted(SERVERS))
def server(
    request: pytest.FixtureRequest, database: ExampleDatabase, tmp_path: Path
) -> Iterator[tuple[httpx.Client, Process]]:
    """One of the signup apps serving on a free port, with its embedded worker."""
    port = free_port()
    process = Process(SERVERS[request.param](port), EXAMPLES, database.env, tmp_path / "app.log")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def answers() -> bool:
        assert process.popen.poll() is None, process.output()
        try:
            return client.get("/users/0").status_code == 404
        except httpx.TransportError:
            return False

    try:
        wait_for(answers, timeout=60)
        yield client, process
    finally:
        client.close()
        process.kill()


def sign_up(client: httpx.Client, count: int) -> list[int]:
    ids = []
    for n in range(count):
        response = client.post("/signup", json={"email": f"user{n}@example.com"})
        assert response.status_code == 201, response.text
        ids.append(response.json()["user"])
    return ids


def test_signup_app_welcomes_every_user_and_refuses_a_second_signup(
    server: tuple[httpx.Client, Process], database: ExampleDatabase
) -> None:
    client, process = server
    ids = sign_up(client, 10)

    again = client.post("/signup", json={"email": "user0@example.com"})

    assert again.status_code == 409
    wait_for(lambda: all(client.get(f"/users/{i}").json()["welcomed"] for i in ids))
    assert process.stop(), process.output()
    # The refused signup rolled back its job with its user: one job per user.
    assert database.statuses() == {"succeeded": 10}


def test_stopping_the_signup_app_loses_no_welcome(
    server: tuple[httpx.Client, Process], database: ExampleDatabase
) -> None:
    client, process = server
    ids = sign_up(client, 30)

    assert process.stop(), process.output()
    after = database.statuses()
    assert set(after) <= {"succeeded", "queued"} and sum(after.values()) == 30  # none running

    worked = run(
        [sys.executable, "-m", "tasklet", "workoff", "--import", "signup.jobs"],
        EXAMPLES,
        database.env,
    )
    assert worked.returncode == 0, worked.stdout + worked.stderr
    welcomed = database.query("SELECT id FROM users WHERE welcomed_at IS NOT NULL ORDER BY id")
    assert [row[0] for row in welcomed] == ids, database.query("SELECT * FROM job_runs")


def test_signup_apps_own_tests_pass_with_the_pytest_plugin(database: ExampleDatabase) -> None:
    tested = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "signup"],
        EXAMPLES,
        database.env,
    )

    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "4 passed" in tested.stdout


# -------------------------------------------------------------------- the batch


def test_batch_script_defers_a_batch_and_waits_for_every_result(
    database: ExampleDatabase, tmp_path: Path
) -> None:
    done = run([sys.executable, str(EXAMPLES / "batch.py")], tmp_path, database.env)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "200 succeeded, 0 failed" in done.stdout
    assert "total words: 39800" in done.stdout


def test_batch_script_waits_for_a_worker_running_elsewhere(
    database: ExampleDatabase, tmp_path: Path
) -> None:
    migrated = run([sys.executable, "-m", "tasklet", "migrate"], tmp_path, database.env)
    assert migrated.returncode == 0, migrated.stderr
    worker = Process(
        [sys.executable, "-m", "tasklet", "worker", "-q", "batch", "--import", "batch_jobs"],
        EXAMPLES,
        database.env,
        tmp_path / "worker.log",
    )
    try:
        script = [sys.executable, str(EXAMPLES / "batch.py"), "--no-worker", "--documents", "50"]
        done = run(script, tmp_path, database.env)
        assert done.returncode == 0, done.stdout + done.stderr + worker.output()
        assert "50 succeeded, 0 failed" in done.stdout
        assert worker.stop(), worker.output()
    finally:
        worker.kill()


# -------------------------------------------------------------- the cron job


def test_cron_example_runs_each_tick_of_its_schedule_once(
    database: ExampleDatabase, tmp_path: Path
) -> None:
    done = run([sys.executable, str(EXAMPLES / "cron.py")], tmp_path, database.env)

    assert done.returncode == 0, done.stdout + done.stderr
    ticks = done.stdout.split(": ", 1)[1].split()
    times = [dt.datetime.fromisoformat(t.rstrip(",")) for t in ticks]
    assert len(times) == len(set(times)) >= 3  # one job per tick
    assert all((b - a).total_seconds() % 2 == 0 for a, b in itertools.pairwise(times))
    scheduled = database.query("SELECT count(*) FROM schedule_ticks")[0][0]
    assert scheduled >= len(times)


# ---------------------------------------------------------- the Alembic project

PROJECT = EXAMPLES / "alembic_project"


def alembic(project: Path, database: ExampleDatabase, *args: str) -> str:
    done = run([str(BIN / "alembic"), *args], project, database.env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_alembic_upgrade_heads_applies_the_apps_migrations_and_taskets(
    database: ExampleDatabase,
) -> None:
    alembic(PROJECT, database, "upgrade", "heads")

    tables = {
        row[0]
        for row in database.query(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            if database.url.startswith("sqlite")
            else "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
    }
    assert tables == {"customers", "orders", "alembic_version"} | TABLE_NAMES | {VERSION_TABLE}
    assert database.query("SELECT version_num FROM alembic_version") == [("shop_0001",)]
    head = ScriptDirectory(str(script_location())).get_current_head()
    assert database.query(f"SELECT version_num FROM {VERSION_TABLE}") == [(head,)]
    migrated = run([sys.executable, "-m", "tasklet", "migrate"], PROJECT, database.env)
    assert "nothing to do" in migrated.stdout, migrated.stdout + migrated.stderr


def test_alembic_autogenerate_in_the_app_leaves_tasklets_tables_alone(
    database: ExampleDatabase, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("__pycache__", "*.db"))
    alembic(project, database, "upgrade", "heads")
    assert "No new upgrade operations detected" in alembic(project, database, "check")
    models = project / "shop" / "models.py"
    models.write_text(
        models.read_text().replace(
            "    total_cents: Mapped[int]\n",
            "    total_cents: Mapped[int]\n    note: Mapped[str | None]\n",
        )
    )

    alembic(project, database, "revision", "--autogenerate", "-m", "order notes")

    (revision,) = [p for p in (project / "migrations" / "versions").glob("*order_notes.py")]
    text = revision.read_text()
    assert "'orders'" in text and "add_column(sa.Column('note'" in text.replace(
        "op.add_column('orders', ", "add_column("
    )
    assert not any(f"'{name}'" in text for name in TABLE_NAMES | {VERSION_TABLE}), text
