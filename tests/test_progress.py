"""`tasklet workoff` shows a progress bar on a terminal and plain log lines elsewhere."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from tasklet import storage
from tasklet._database import Database
from tasklet.storage import NewJob
from tests import progress_jobs
from tests.support import REPO, Backend

pytestmark = pytest.mark.slow

WORKOFF = [sys.executable, "-m", "tasklet", "workoff", "--import", "tests.progress_jobs"]


def defer_some() -> None:
    progress_jobs.ok.defer_many([{"n": i} for i in range(20)])
    progress_jobs.fail.defer_many([{"n": i} for i in range(3)])


def plain(screen: str) -> str:
    """The screen without terminal escapes (colours, cursor moves)."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)


def on_a_terminal(backend: Backend) -> tuple[int, str]:
    """Run workoff on a pseudo-terminal (stdin, stdout, stderr): its exit code and screen."""
    controller, terminal = pty.openpty()
    env = {**backend.env, "TERM": "xterm-256color", "COLUMNS": "120"}
    process = subprocess.Popen(
        WORKOFF, cwd=REPO, env=env, stdin=terminal, stdout=terminal, stderr=terminal
    )
    os.close(terminal)
    screen = bytearray()
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            screen += chunk
    finally:
        os.close(controller)
    return process.wait(timeout=30), screen.decode(errors="replace")


def test_workoff_on_a_terminal_draws_a_bar_of_jobs_done_with_the_errors(
    db: Database, backend: Backend
) -> None:
    defer_some()

    code, screen = on_a_terminal(backend)

    assert code == 0, screen
    text = plain(screen)
    assert "\x1b[" in screen  # drawn for a terminal: colours, the cursor rewinding
    assert "━" in text, text
    assert "23/23 jobs" in text, text
    assert "3 errors" in text, text


def test_workoff_on_a_terminal_leaves_out_the_line_per_job(db: Database, backend: Backend) -> None:
    defer_some()

    code, screen = on_a_terminal(backend)

    assert code == 0, screen
    text = plain(screen)
    assert "succeeded in" not in text
    assert "failure 0; no retry" in text  # failures still print, above the bar
    assert "Traceback" not in text


def test_workoff_without_a_terminal_logs_plain_lines(db: Database, backend: Backend) -> None:
    defer_some()

    result = subprocess.run(
        WORKOFF, cwd=REPO, env=backend.env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert "tasklet.workoff: 23 jobs due" in result.stderr
    assert "tasklet.workoff: finished 23 jobs in" in result.stderr
    assert ", 3 errors" in result.stderr
    assert "━" not in result.stderr
    assert "\x1b[" not in result.stderr


def test_workoff_bar_counts_only_the_jobs_this_worker_can_run(
    db: Database, backend: Backend
) -> None:
    progress_jobs.ok.defer_many([{"n": i} for i in range(4)])
    storage.jobs_insert(
        db,
        [
            NewJob(
                name="tests.progress.unknown",
                queue="default",
                priority=0,
                max_attempts=1,
                timeout=None,
                serializer="json",
                args={},
                args_pickle=None,
            )
        ],
    )

    code, screen = on_a_terminal(backend)

    assert code == 0, screen
    assert "4/4 jobs" in plain(screen)
