"""How an idle worker hears of new jobs without waiting for its next poll.

* PostgreSQL: enqueue sends ``pg_notify`` in its transaction; a listener thread
  on its own connection LISTENs and wakes the worker. It reconnects after a
  lost connection and then wakes the worker anyway, for what it missed.
* SQLite has no notifications: every commit appends to the ``-wal`` file, so a
  worker checks that file's size and time every few milliseconds (a ``stat``,
  no query) and looks for jobs only when it changed.
* In one process, a defer wakes that process's workers at once.
* Control messages (``cancel:<job id>``) travel the same ways: a second
  PostgreSQL channel (``<channel>_control``) that the same listener LISTENs
  to, and in-process delivery to the workers of this process. SQLite workers
  in other processes hear of them by looking (see tasklet._cancel).

A NOTIFY costs PostgreSQL a global lock at commit, which would make it the
larger part of a small enqueue. So a process that defers in bursts notifies at
most once per ``NOTIFY_EVERY_S`` per database; in exchange, a worker that heard
a notification keeps looking for jobs every ``HOT_CHECK_S`` for ``HOT_FOR_S``,
which finds the jobs whose notification was left out. Enqueues into the
caller's own transaction always notify (their commit may come much later).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("tasklet.worker")

NOTIFY_EVERY_S = 0.005
HOT_CHECK_S = 0.010
HOT_FOR_S = 1.0

Wake = Callable[[str | None], None]
#: Takes a control message, or None for "you may have missed some: look".
Control = Callable[[str | None], None]

_lock = threading.Lock()
_local: dict[str, set[Wake]] = {}
_local_control: dict[str, set[Control]] = {}


def subscribe(key: str, wake: Wake) -> Callable[[], None]:
    """Call ``wake(queue)`` when this process defers a job into database ``key``."""
    with _lock:
        _local.setdefault(key, set()).add(wake)

    def unsubscribe() -> None:
        with _lock:
            _local.get(key, set()).discard(wake)

    return unsubscribe


_last_notify: dict[str, float] = {}


def notify_now(key: str) -> bool:
    """Whether a defer that commits at once should send NOTIFY (see the module's docstring).

    No lock: two threads that race here both notify, which only costs a NOTIFY.
    """
    now = time.monotonic()
    if now - _last_notify.get(key, -1.0) < NOTIFY_EVERY_S:
        return False
    _last_notify[key] = now
    return True


def publish(key: str, queues: Iterable[str]) -> None:
    if not _local.get(key):  # no worker in this process: the common case of a web app
        return
    with _lock:
        wakes = list(_local.get(key, ()))
    for wake in wakes:
        for queue in queues:
            wake(queue)


def subscribe_control(key: str, control: Control) -> Callable[[], None]:
    """Call ``control(message)`` for each control message this process sends to ``key``."""
    with _lock:
        _local_control.setdefault(key, set()).add(control)

    def unsubscribe() -> None:
        with _lock:
            _local_control.get(key, set()).discard(control)

    return unsubscribe


def publish_control(key: str, message: str) -> None:
    with _lock:
        controls = list(_local_control.get(key, ()))
    for control in controls:
        control(message)


class PostgresListener(threading.Thread):
    """LISTENs on its own connection; calls ``wake(queue)`` for each notification.

    With ``control``, it also LISTENs on ``control_channel`` and calls
    ``control(payload)`` for each message there, and ``control(None)`` after
    each (re)connection, for the messages sent while it was not listening.
    """

    def __init__(
        self,
        conninfo: str,
        channel: str,
        wake: Wake,
        *,
        name: str,
        check_s: float = 1.0,
        control_channel: str | None = None,
        control: Control | None = None,
    ) -> None:
        super().__init__(name="tasklet-listener", daemon=True)
        #: Shown as the connection's application_name in pg_stat_activity.
        self.application_name = name[:63]
        self._conninfo = conninfo
        self._channel = channel
        self._wake = wake
        self._check_s = check_s
        self._control_channel = control_channel if control is not None else None
        self._control = control
        self._stop = threading.Event()
        self.connected = threading.Event()
        #: How many times the listener has connected (more than 1: it reconnected).
        self.connections = 0

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        import psycopg

        retry_s = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._conninfo, autocommit=True, application_name=self.application_name
                ) as conn:
                    conn.execute(f'LISTEN "{self._channel}"')
                    if self._control_channel is not None:
                        conn.execute(f'LISTEN "{self._control_channel}"')
                    self.connections += 1
                    self.connected.set()
                    retry_s = 0.1
                    # Whatever was sent while we were not listening.
                    self._wake(None)
                    if self._control is not None:
                        self._control(None)
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=self._check_s):
                            if notice.channel == self._channel or self._control is None:
                                self._wake(notice.payload)
                            else:
                                self._control(notice.payload)
            except Exception as exc:
                self.connected.clear()
                if self._stop.is_set():
                    return
                log.warning(
                    "listener lost its connection (%s); reconnecting in %.1fs", exc, retry_s
                )
                self._stop.wait(retry_s)
                retry_s = min(retry_s * 2, 5.0)


class SqliteWatcher:
    """Tells whether the database's write-ahead log changed since the last look."""

    def __init__(self, database_path: str) -> None:
        self._wal = Path(f"{database_path}-wal")
        self._last = self._signature()

    def _signature(self) -> tuple[int, int]:
        try:
            stat = os.stat(self._wal)
        except FileNotFoundError:
            return (0, 0)
        return (stat.st_size, stat.st_mtime_ns)

    def changed(self) -> bool:
        now = self._signature()
        changed, self._last = now != self._last, now
        return changed
