"""The worker's scheduler: a thread that enqueues the ticks of the jobs' recurring schedules.

Every running worker schedules, each on its own thread and connections; the
``schedule_ticks`` table makes each tick one job (see storage/schedules.py),
so a worker that dies leaves no gap while another runs.

Which ticks: a tick is *on time* if it comes while this scheduler runs and it
gets to it within ``late_s`` (the worker's ``lost_after_s``); each one is
enqueued. Earlier ticks since the schedule's last enqueued one came while no
worker was scheduling (before this one started, or while it was frozen for
longer than a live worker may be): they are *missed*, and the schedule's
``catch_up`` says how many of the latest of them still run.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import exc as sa_exc

from . import _wakeup, storage
from ._database import Database
from .errors import DatabaseUnavailableError, SchemaMissingError
from .schedules import Schedule, registered

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("tasklet.scheduler")

#: Each scheduler keeps this many of every schedule's latest ticks (more with catch_up)
#: and deletes older ones.
KEEP_TICKS = 100
PRUNE_EVERY_S = 60.0
#: After a failure (the database is down), try again this soon.
RETRY_S = 1.0
#: Sleep at most this long, so a wall clock that jumps is noticed.
MAX_SLEEP_S = 60.0
_RETRIED = (sa_exc.SQLAlchemyError, DatabaseUnavailableError, SchemaMissingError)


def start(worker: Worker) -> Scheduler | None:
    """Start scheduling the jobs ``worker`` knows, unless it has none or schedules are off."""
    mine = registered()
    if not worker.settings.schedules or not mine:
        return None
    scheduler = Scheduler(worker.db, mine, late_s=worker.settings.lost_after_s)
    scheduler.start()
    return scheduler


class Scheduler(threading.Thread):
    """Enqueues the ticks of ``schedules`` as they come; see the module's docstring."""

    def __init__(
        self,
        db: Database,
        schedules: Sequence[Schedule],
        *,
        late_s: float,
        started_at: dt.datetime | None = None,
    ) -> None:
        super().__init__(name="tasklet-scheduler", daemon=True)
        self.db = db
        self.schedules = list(schedules)
        self.late = dt.timedelta(seconds=late_s)
        self.started_at = started_at or storage.utcnow()
        #: Per schedule, the tick up to which every tick has been enqueued or passed over.
        self.cursors: dict[str, dt.datetime] | None = None
        self._next_prune = self.started_at
        self._stop_event = threading.Event()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        log.info("scheduling %s", ", ".join(f"{s.name!r}" for s in self.schedules) or "(nothing)")
        while not self._stop_event.is_set():
            try:
                now = storage.utcnow()
                if self.run_pass(now):
                    wait_s = (self.next_tick(now) - storage.utcnow()).total_seconds()
                else:
                    wait_s = RETRY_S
            except Exception as exc:
                log.warning("scheduling failed (%s); trying again in %gs", exc, RETRY_S)
                wait_s = RETRY_S
            self._stop_event.wait(min(max(wait_s, 0.001), MAX_SLEEP_S))

    def run_pass(self, now: dt.datetime) -> bool:
        """Enqueue every tick due by ``now``; False if some must be tried again."""
        if self.cursors is None:
            last = storage.schedule_last_ticks(self.db, [s.name for s in self.schedules])
            self.cursors = {s.name: last.get(s.name, self.started_at) for s in self.schedules}
        live_from = max(self.started_at, now - self.late)
        complete = True
        for schedule in self.schedules:
            complete &= self._run_schedule(schedule, live_from, now)
        if now >= self._next_prune:
            self._next_prune = now + dt.timedelta(seconds=PRUNE_EVERY_S)
            self.prune(now)
        return complete

    def prune(self, now: dt.datetime) -> None:
        """Delete old ticks, keeping any another scheduler may still try to enqueue.

        A scheduler tries the on-time ticks of the last ``late_s``, and of missed
        ones at most ``catch_up`` of the latest (which may be old): deleting
        either would let it enqueue a tick a second time.
        """
        keep = {s.name: KEEP_TICKS + s.catch_up for s in self.schedules}
        storage.schedule_ticks_prune(self.db, keep, before=now - 2 * self.late)

    def _run_schedule(self, schedule: Schedule, live_from: dt.datetime, now: dt.datetime) -> bool:
        assert self.cursors is not None
        after = self.cursors[schedule.name]
        for tick in schedule.due(after, live_from, now):
            try:
                self._enqueue(schedule, tick)
            except _RETRIED as exc:
                log.warning("could not enqueue tick %s of %r: %s", tick, schedule.name, exc)
                return False
            except Exception:  # a bug or bad arguments: retrying would fail again
                log.exception("tick %s of %r was not enqueued", tick, schedule.name)
            self.cursors[schedule.name] = tick
        self.cursors[schedule.name] = max(self.cursors[schedule.name], now)
        return True

    def _enqueue(self, schedule: Schedule, tick: dt.datetime) -> None:
        row = schedule.new_row(tick)
        inserted = storage.schedule_tick_insert(self.db, schedule=schedule.name, tick=tick, job=row)
        if inserted is None:
            return  # another worker enqueued it
        _wakeup.publish(self.db.wake_key, [row.queue])
        log.info(
            "tick %s of %r: job %d%s",
            tick.isoformat(),
            schedule.name,
            inserted.id,
            "" if inserted.created else " (its unique key was held: no new job)",
        )

    def next_tick(self, now: dt.datetime) -> dt.datetime:
        """When the next pass is due: the first tick after what is done."""
        assert self.cursors is not None
        return min(
            (s.next_after(max(self.cursors[s.name], now)) for s in self.schedules),
            default=now + dt.timedelta(seconds=MAX_SLEEP_S),
        )
