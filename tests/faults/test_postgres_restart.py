"""A PostgreSQL restart in the middle of a run: every job completes, and LISTEN comes back.

The test starts a private cluster of its own (initdb and pg_ctl on a spare port),
so the shared server is never restarted.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tasklet
from tasklet import storage
from tasklet._database import Database
from tests import worker_jobs
from tests.support import Backend, Log, finish, tasklet_process, wait_for, wait_for_db

pytestmark = [pytest.mark.faults, pytest.mark.slow]

BIN = (
    Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1])
    if glob.glob("/usr/lib/postgresql/*/bin")
    else None
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cluster:
    """A throwaway PostgreSQL server run as the ``postgres`` user."""

    def __init__(self) -> None:
        assert BIN is not None, "PostgreSQL server binaries are not installed"
        self.dir = Path(tempfile.mkdtemp(prefix="tasklet-pg-"))
        shutil.chown(self.dir, "postgres")
        self.port = _free_port()
        self._as_postgres(BIN / "initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U",
                          "postgres")  # fmt: skip
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: object) -> None:
        prefix = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]
        subprocess.run([*prefix, *map(str, command)], check=True, capture_output=True, cwd=self.dir)

    def pg_ctl(self, *args: str) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off"
        self._as_postgres(BIN / "pg_ctl" if BIN else "", "-D", self.dir / "data", "-w",
                          "-o", options, "-l", self.dir / "log", *args)  # fmt: skip

    def remove(self) -> None:
        try:
            self.pg_ctl("stop", "-m", "immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    server = Cluster()
    server.pg_ctl("start")
    try:
        yield server
    finally:
        server.remove()


def test_jobs_complete_across_a_server_restart_and_listen_comes_back(
    cluster: Cluster, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    backend = Backend("postgres", cluster.url, None)
    db: Database = backend.configure()
    tasklet.upgrade()
    jobs = 3000
    worker_jobs.count.defer_many([{"n": n} for n in range(jobs)])
    worker = tasklet_process(
        backend, log, "worker", "-q", "work", "--concurrency", "20", "--poll", "600",
        "--heartbeat", "0.5", "--lost-after", "5", "--sweep", "0.5",
    )  # fmt: skip
    processes.append(worker)
    wait_for(lambda: len(log.lines("done")) >= 300)
    cluster.pg_ctl("restart", "-m", "immediate")  # a crash: in-flight transactions are lost
    wait_for_db(lambda: storage.jobs_count(db).get("succeeded", 0) == jobs, timeout=120)

    # This process's pooled connections died with the server: the first use of each
    # fails once (DatabaseUnavailableError) and the pool is renewed, as with SQLAlchemy.
    wait_for_db(lambda: worker_jobs.count.defer_in(3600, n=-1) is not None)

    # After recovery a new job starts in well under a second: a wake-up, not the
    # 10-minute poll, so LISTEN came back.
    started = time.monotonic()
    probe = worker_jobs.count.defer(n=jobs)
    wait_for(lambda: probe.id in log.done_per_job(), timeout=30)
    assert time.monotonic() - started < 1.0
    worker.terminate()
    code, output = finish(worker)

    assert code == 0, output
    done = log.done_per_job()
    reran = [job_id for job_id, n in done.items() if n > 1]
    assert len(done) == jobs + 1  # the scheduled warm-up job is not due
    # Only attempts cut short by the crash may run twice: at most the worker's slots,
    # plus the finished attempts it had not written yet.
    assert len(reran) <= 20 + 500, reran
    tasklet.configure()
