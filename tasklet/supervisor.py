"""Several worker processes per queue, kept running: ``tasklet start -n default:2,email:1``.

``start`` launches a detached supervisor that runs the workers of the spec and
restarts any that dies, after a backoff that doubles up to a cap and starts
over once a worker has run a while. ``stop`` sends the supervisor SIGTERM; it
passes SIGTERM to its workers (each finishes its running jobs within its
grace), kills what is left after the grace, and exits. The state directory
(``.tasklet/`` by default) holds the pidfile, the supervisor's record of what
it runs, its log (the workers' output too) and a lock held while it runs, which
tells a live supervisor from a stale pidfile.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TaskletError

__all__ = ["Backoff", "StateDir", "Supervisor", "parse_spec"]

log = logging.getLogger("tasklet.supervisor")

SPEC_HELP = "QUEUE:COUNT[,QUEUE:COUNT...], e.g. default:2,email:1; a bare COUNT takes every queue"


def parse_spec(text: str) -> list[tuple[str | None, int]]:
    """``default:2,email:1`` as ``[("default", 2), ("email", 1)]``; ``3`` is 3 of every queue."""
    entries: list[tuple[str | None, int]] = []
    for part in text.split(","):
        queue, colon, count = part.strip().rpartition(":")
        if not colon:
            queue, count = "", part.strip()
        if (colon and not queue) or not count.isdigit() or int(count) < 1:
            raise TaskletError(f"cannot read the worker spec {text!r}: use {SPEC_HELP}")
        entries.append((queue or None, int(count)))
    return entries


def format_spec(entries: Sequence[tuple[str | None, int]]) -> str:
    return ",".join(str(n) if q is None else f"{q}:{n}" for q, n in entries)


@dataclass(frozen=True)
class Backoff:
    """Delay before restarting a worker that died: doubles from ``base_s`` up to ``cap_s``.

    A worker that ran at least ``reset_after_s`` before dying is restarted
    after ``base_s`` again: only a crash loop waits longer and longer.
    """

    base_s: float = 1.0
    cap_s: float = 60.0
    reset_after_s: float = 60.0

    def delay(self, failures: int) -> float:
        """The wait before the restart that follows ``failures`` quick deaths in a row (>= 1)."""
        return min(self.cap_s, self.base_s * 2.0 ** max(0, failures - 1))


class StateDir:
    """Where a supervisor keeps its pidfile, record, log and lock."""

    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        self.pidfile = self.path / "supervisor.pid"
        self.record = self.path / "supervisor.json"
        self.logfile = self.path / "supervisor.log"
        self.lockfile = self.path / "supervisor.lock"

    def running_pid(self) -> int | None:
        """The live supervisor's pid, or None (a pidfile without the lock held is stale)."""
        if not self.lockfile.exists():
            return None
        with open(self.lockfile, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._read_pid()
            fcntl.flock(lock, fcntl.LOCK_UN)
            return None

    def _read_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None  # the supervisor is starting or stopping

    def read_record(self) -> dict[str, Any]:
        try:
            record: dict[str, Any] = json.loads(self.record.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return record

    @contextlib.contextmanager
    def hold(self, record: dict[str, Any]) -> Iterator[None]:
        """Take the lock, write the pidfile and record; remove them on the way out."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.lockfile, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TaskletError(
                    f"a supervisor already runs in {self.path} (pid {self._read_pid()}): "
                    "`tasklet stop` or `tasklet restart` it, or pass another --state-dir"
                ) from None
            try:
                _write_atomically(self.record, json.dumps(record, indent=2) + "\n")
                _write_atomically(self.pidfile, f"{os.getpid()}\n")
                yield
            finally:
                for path in (self.pidfile, self.record):
                    path.unlink(missing_ok=True)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


@dataclass
class _Slot:
    """One worker process the supervisor keeps running."""

    queue: str | None
    number: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.queue or '(all queues)'}#{self.number}"


@dataclass
class Supervisor:
    """Runs the workers of ``spec`` in the foreground until SIGTERM or SIGINT."""

    spec: list[tuple[str | None, int]]
    worker_options: list[str]
    grace_s: float
    #: The workers' environment (None: the supervisor's own).
    env: dict[str, str] | None = None
    backoff: Backoff = field(default_factory=Backoff)
    _stop: threading.Event = field(default_factory=threading.Event)
    _slots: list[_Slot] = field(default_factory=list)

    def run(self) -> int:
        slots = self._slots = [_Slot(q, i + 1) for q, count in self.spec for i in range(count)]
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        log.info(
            "supervisor %d: starting %d workers (%s)",
            os.getpid(),
            len(slots),
            format_spec(self.spec),
        )
        try:
            for slot in slots:
                self._spawn(slot)
            while not self._stop.is_set():
                self._tend(slots)
                self._stop.wait(0.1)
        finally:
            self._shut_down(slots)
        log.info("supervisor %d: stopped", os.getpid())
        return 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self._stop.is_set():
            log.info("%s: stopping the workers", signal.Signals(signum).name)
            self._stop.set()
            return
        # A second signal, as for a worker: stop now, running jobs go back to the queue.
        log.warning("%s again: the workers stop now", signal.Signals(signum).name)
        for slot in self._slots:
            if slot.process is not None and slot.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signal.SIGTERM)

    def _command(self, slot: _Slot) -> list[str]:
        queues = [] if slot.queue is None else ["--queue", slot.queue]
        return [sys.executable, "-m", "tasklet", "worker", *queues, *self.worker_options]

    def _spawn(self, slot: _Slot) -> None:
        slot.process = subprocess.Popen(
            self._command(slot),
            stdin=subprocess.DEVNULL,  # its output goes where the supervisor's goes
            env=self.env,
            preexec_fn=_die_with_parent,  # safe: the supervisor runs no other thread
        )
        slot.started = time.monotonic()
        log.info("worker %s started: pid %d", slot.label, slot.process.pid)

    def _tend(self, slots: list[_Slot]) -> None:
        now = time.monotonic()
        for slot in slots:
            process = slot.process
            if process is not None and process.poll() is not None:
                ran = now - slot.started
                slot.failures = 1 if ran >= self.backoff.reset_after_s else slot.failures + 1
                delay = self.backoff.delay(slot.failures)
                log.warning(
                    "worker %s (pid %d) exited with %s after %.1fs; restarting in %.1fs",
                    slot.label,
                    process.pid,
                    _exit_text(process.returncode),
                    ran,
                    delay,
                )
                slot.process, slot.restart_at = None, now + delay
            if slot.process is None and now >= slot.restart_at:
                self._spawn(slot)

    def _shut_down(self, slots: list[_Slot]) -> None:
        running = [s.process for s in slots if s.process is not None and s.process.poll() is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        # Each worker gives its running jobs the grace; a little more for it to write them.
        deadline = time.monotonic() + self.grace_s + 10.0
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop within its grace; killing it", process.pid)
                process.kill()
                process.wait()


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM if its supervisor dies, so none outlives a kill -9 of it."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
