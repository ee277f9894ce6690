"""`tasklet start|stop|restart`: worker processes per queue under a detached supervisor."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasklet._database import Database
from tasklet._start import process_alive
from tasklet.errors import TaskletError
from tasklet.storage import admin
from tasklet.supervisor import Backoff, StateDir, parse_spec
from tests import worker_jobs
from tests.support import REPO, Backend, Log, get_row, wait_for
from tests.support import tasklet_command as cli

FAST = ["--heartbeat=0.2", "--lost-after=1", "--sweep=0.2", "--grace=5", "--concurrency=3"]


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateDir]:
    """A state directory; whatever supervisor still runs in it is killed with its workers."""
    directory = StateDir(tmp_path / "state")
    yield directory
    pid = directory.running_pid()
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # its own session: the workers share its group


def alive_by_queue(db: Database) -> dict[int, tuple[str, ...]]:
    workers, _ = admin.workers_alive(db, lost_after_s=1.0)
    return {w.pid: w.queues for w in workers}


def queue_counts(pids: dict[int, tuple[str, ...]]) -> Counter[tuple[str, ...]]:
    return Counter(pids.values())


def start(backend: Backend, state: StateDir, spec: str) -> None:
    result = cli(backend, "start", "-n", spec, f"--state-dir={state.path}", *FAST)
    assert result.returncode == 0, result.stderr
    assert f"under supervisor pid {state.running_pid()}" in result.stdout


# -------------------------------------------------------------------- spec and backoff


def test_spec_names_queues_and_counts() -> None:
    assert parse_spec("default:2,email:1") == [("default", 2), ("email", 1)]


def test_spec_of_a_bare_count_takes_every_queue() -> None:
    assert parse_spec("3") == [(None, 3)]


def test_spec_keeps_colons_inside_queue_names() -> None:
    assert parse_spec("billing:eu:2") == [("billing:eu", 2)]


@pytest.mark.parametrize("spec", ["", "default", "default:0", ":2", "default:two", "a:1,"])
def test_unreadable_spec_is_refused_with_the_expected_form(spec: str) -> None:
    with pytest.raises(TaskletError, match="QUEUE:COUNT"):
        parse_spec(spec)


def test_restart_delay_doubles_up_to_the_cap() -> None:
    backoff = Backoff(base_s=1.0, cap_s=10.0)

    assert [backoff.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


# --------------------------------------------------------------------- processes


@pytest.mark.slow
def test_start_runs_the_workers_of_each_queue_and_stop_leaves_no_process(
    db: Database, backend: Backend, state: StateDir
) -> None:
    start(backend, state, "default:2,email:1")
    wait_for(lambda: queue_counts(alive_by_queue(db)) == {("default",): 2, ("email",): 1})
    supervisor = state.running_pid()
    assert supervisor is not None
    workers = list(alive_by_queue(db))

    result = cli(backend, "stop", f"--state-dir={state.path}")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tasklet: stopped supervisor pid {supervisor} and its workers\n"
    assert [pid for pid in [supervisor, *workers] if process_alive(pid)] == []
    assert not state.pidfile.exists()
    assert admin.workers_alive(db, lost_after_s=60)[0] == []  # each worker unregistered


@pytest.mark.slow
def test_workers_get_the_worker_options_given_to_start(
    sqlite_only: Backend, state: StateDir
) -> None:
    db = sqlite_only.configure()
    start(sqlite_only, state, "email:1")

    wait_for(lambda: len(alive_by_queue(db)) == 1)

    [worker] = admin.workers_alive(db, lost_after_s=1.0)[0]
    assert (worker.queues, worker.concurrency) == (("email",), 3)


@pytest.mark.slow
def test_workers_stop_by_themselves_when_their_supervisor_is_killed(
    sqlite_only: Backend, state: StateDir
) -> None:
    db = sqlite_only.configure()
    start(sqlite_only, state, "2")
    wait_for(lambda: len(alive_by_queue(db)) == 2)
    workers = list(alive_by_queue(db))
    supervisor = state.running_pid()
    assert supervisor is not None

    os.kill(supervisor, signal.SIGKILL)

    wait_for(lambda: not any(process_alive(pid) for pid in workers))


@pytest.mark.slow
def test_a_worker_killed_with_sigkill_is_started_again(
    db: Database, backend: Backend, state: StateDir
) -> None:
    start(backend, state, "default:1,email:1")
    wait_for(lambda: len(alive_by_queue(db)) == 2)
    victim = next(pid for pid, queues in alive_by_queue(db).items() if queues == ("email",))

    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        alive = {pid: q for pid, q in alive_by_queue(db).items() if pid != victim}
        return queue_counts(alive) == {("default",): 1, ("email",): 1}

    wait_for(replaced)
    assert f"(pid {victim}) exited with signal SIGKILL" in state.logfile.read_text()


@pytest.mark.slow
def test_start_refuses_while_a_supervisor_runs_in_the_state_directory(
    sqlite_only: Backend, state: StateDir
) -> None:
    start(sqlite_only, state, "1")

    result = cli(sqlite_only, "start", "-n", "2", f"--state-dir={state.path}")

    assert result.returncode == 1
    assert f"a supervisor already runs in {state.path} (pid {state.running_pid()})" in result.stderr


@pytest.mark.slow
def test_restart_without_a_spec_starts_the_same_workers_again(
    db: Database, backend: Backend, state: StateDir
) -> None:
    start(backend, state, "email:2")
    wait_for(lambda: len(alive_by_queue(db)) == 2)
    before = set(alive_by_queue(db))

    result = cli(backend, "restart", f"--state-dir={state.path}")

    assert result.returncode == 0, result.stderr
    wait_for(lambda: len(set(alive_by_queue(db)) - before) == 2)
    assert [pid for pid in before if process_alive(pid)] == []


@pytest.mark.slow
def test_stop_with_another_spec_than_the_running_one_is_refused(
    sqlite_only: Backend, state: StateDir
) -> None:
    start(sqlite_only, state, "email:1")

    result = cli(sqlite_only, "stop", "-n", "default:1", f"--state-dir={state.path}")

    assert result.returncode == 1
    assert "runs email:1, not default:1" in result.stderr
    assert state.running_pid() is not None


@pytest.mark.slow
def test_stop_without_a_supervisor_says_there_is_nothing_to_stop(
    sqlite_only: Backend, state: StateDir
) -> None:
    result = cli(sqlite_only, "stop", f"--state-dir={state.path}")

    assert result.returncode == 0
    assert result.stdout == f"tasklet: no supervisor runs in {state.path}: nothing to stop\n"


@pytest.mark.slow
def test_start_takes_queues_from_the_spec_not_from_q(sqlite_only: Backend, state: StateDir) -> None:
    result = cli(sqlite_only, "start", "-n", "2", "-q", "email", f"--state-dir={state.path}")

    assert result.returncode == 1
    assert "not from -q" in result.stderr


@pytest.mark.slow
def test_a_worker_that_keeps_dying_waits_longer_each_time(
    sqlite_only: Backend, state: StateDir
) -> None:
    result = cli(
        sqlite_only, "start", "-n", "1", f"--state-dir={state.path}", "--import=tests.no_such"
    )
    assert result.returncode == 0, result.stderr

    def delays() -> list[str]:
        lines = state.logfile.read_text().splitlines()
        return [line.rpartition("restarting in ")[2] for line in lines if "restarting in" in line]

    wait_for(lambda: len(delays()) >= 3)
    assert delays()[:3] == ["1.0s", "2.0s", "4.0s"]


@pytest.mark.slow
def test_workers_use_the_database_given_to_start_on_its_command_line(
    sqlite_only: Backend, state: StateDir, tmp_path: Path
) -> None:
    db = sqlite_only.configure()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKLET_")}
    elsewhere = tmp_path / "elsewhere"  # its default, sqlite:///tasklet.db, would be in here
    elsewhere.mkdir()
    command = ["--database-url", sqlite_only.url, "start", "-n", "1", f"--state-dir={state.path}"]

    result = subprocess.run(
        [sys.executable, "-m", "tasklet", *command, *FAST],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    wait_for(lambda: len(alive_by_queue(db)) == 1)


@pytest.mark.slow
def test_supervise_runs_in_the_foreground_until_sigterm_with_the_database_given(
    sqlite_only: Backend, state: StateDir, tmp_path: Path
) -> None:
    db = sqlite_only.configure()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKLET_")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = [
        "--database-url",
        sqlite_only.url,
        "supervise",
        "-n",
        "1",
        f"--state-dir={state.path}",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "tasklet", *command, *FAST],
        env=env,
        cwd=elsewhere,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: len(alive_by_queue(db)) == 1)
        [worker] = alive_by_queue(db)

        process.send_signal(signal.SIGTERM)

        assert process.wait(timeout=30) == 0
        assert not process_alive(worker)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_a_second_sigterm_stops_the_workers_at_once_and_their_jobs_go_back(
    sqlite_only: Backend, state: StateDir, tmp_path: Path
) -> None:
    db = sqlite_only.configure()
    runs = Log(tmp_path / "runs.log")
    handle = worker_jobs.nap.defer(first_run_s=60.0)
    output = tmp_path / "supervise.out"
    env = {**sqlite_only.env, "TASKLET_TEST_LOG": str(runs.path)}
    command = ["supervise", "-n", "work:1", f"--state-dir={state.path}", *FAST, "--grace=60"]
    with open(output, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tasklet", *command, "--import=tests.worker_jobs"],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: runs.lines("start") != [])
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: "running jobs have 60s to finish" in output.read_text())

        process.send_signal(signal.SIGTERM)

        assert process.wait(timeout=20) == 0
        assert get_row(db, handle.id).status == "queued"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
