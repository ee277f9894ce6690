"""The worker's scheduler on SQLite and PostgreSQL: every tick enqueued once, none lost."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import signal
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from tasklet import _registry, _scheduler, cli, job, periodic, schedules, storage
from tasklet._database import Database
from tasklet._scheduler import Scheduler
from tasklet.schedules import Schedule
from tasklet.schema import jobs, schedule_ticks, workers
from tasklet.worker import Worker, WorkerSettings
from tests import support
from tests.support import (
    FAST,
    Backend,
    BackgroundWorker,
    Log,
    finish,
    get_row,
    tasklet_process,
    wait_for,
)

UTC = dt.UTC
STARTED = dt.datetime(2026, 6, 1, 12, 0, 30, tzinfo=UTC)
NOON = dt.datetime(2026, 6, 1, 12, tzinfo=UTC)
SECOND = dt.timedelta(seconds=1)
#: tests/schedule_jobs.py's schedule (not imported here: this process would schedule it too).
SCHEDULE_OF_PROCESSES = "tests.every-second"


def at(hh_mm: str) -> dt.datetime:
    hours, minutes = map(int, hh_mm.split(":"))
    return dt.datetime(2026, 6, 1, hours, minutes, tzinfo=UTC)


def minutely(
    catch_up: int = 1, *, queue: str = "default", priority: int = 0, unique: bool = False
) -> Schedule:
    @periodic("* * * * *", name="every-minute", catch_up=catch_up, kwargs={"n": 7})
    @job(name="sc.minutely", queue=queue, priority=priority, unique=unique)
    def task(n: int) -> None: ...

    (schedule,) = [s for s in schedules.registered() if s.name == "every-minute"]
    return schedule


def scheduler(db: Database, schedule: Schedule, late_s: float = 30.0) -> Scheduler:
    return Scheduler(db, [schedule], late_s=late_s, started_at=STARTED)


def enqueued(db: Database, name: str | None = None) -> list[dt.datetime]:
    """The due times of the jobs in ``jobs`` (a schedule's job is due at its tick)."""
    query = sa.select(jobs.c.run_at).order_by(jobs.c.run_at)
    if name is not None:
        query = query.where(jobs.c.name == name)
    with db.begin(read_only=True) as conn:
        values = conn.execute(query, execution_options=db.execution_options).scalars()
        return [v.astimezone(UTC) if v.tzinfo else v.replace(tzinfo=UTC) for v in values]


def ticks(db: Database, schedule: str) -> list[tuple[dt.datetime, int | None]]:
    query = (
        sa.select(schedule_ticks.c.tick, schedule_ticks.c.job_id)
        .where(schedule_ticks.c.schedule == schedule)
        .order_by(schedule_ticks.c.tick)
    )
    with db.begin(read_only=True) as conn:
        rows = conn.execute(query, execution_options=db.execution_options).all()
    return [(storage.as_utc(t) or t, job_id) for t, job_id in rows]


def seed_last_tick(db: Database, schedule: Schedule, tick: dt.datetime) -> None:
    """As if the fleet had enqueued ``tick`` and then stopped."""
    assert storage.schedule_tick_insert(
        db, schedule=schedule.name, tick=tick, job=schedule.new_row(tick)
    )


# ------------------------------------------------------------- missed ticks


def test_a_new_schedule_starts_with_the_first_tick_after_the_worker_started(db: Database) -> None:
    schedule = minutely()
    runner = scheduler(db, schedule)

    runner.run_pass(STARTED)
    assert enqueued(db) == []
    runner.run_pass(at("12:01"))

    assert enqueued(db) == [at("12:01")]


def test_by_default_the_latest_tick_missed_while_no_worker_ran_is_enqueued_once(
    db: Database,
) -> None:
    schedule = minutely()
    seed_last_tick(db, schedule, at("10:00"))

    scheduler(db, schedule).run_pass(STARTED)
    scheduler(db, schedule).run_pass(STARTED + SECOND)  # a second worker starting

    assert enqueued(db) == [at("10:00"), at("12:00")]


def test_with_catch_up_zero_missed_ticks_are_skipped_and_the_next_one_runs(db: Database) -> None:
    schedule = minutely(catch_up=0)
    seed_last_tick(db, schedule, at("10:00"))
    runner = scheduler(db, schedule)

    runner.run_pass(STARTED)
    assert enqueued(db) == [at("10:00")]
    runner.run_pass(at("12:01"))

    assert enqueued(db) == [at("10:00"), at("12:01")]


def test_with_catch_up_n_the_n_latest_missed_ticks_are_enqueued(db: Database) -> None:
    schedule = minutely(catch_up=3)
    seed_last_tick(db, schedule, at("10:00"))

    scheduler(db, schedule).run_pass(STARTED)

    assert enqueued(db) == [at("10:00"), at("11:58"), at("11:59"), at("12:00")]


def test_ticks_a_frozen_worker_got_to_too_late_count_as_missed(db: Database) -> None:
    schedule = minutely()
    runner = scheduler(db, schedule, late_s=30)
    runner.run_pass(STARTED)

    runner.run_pass(at("12:10") + dt.timedelta(seconds=20))  # ten minutes later

    assert enqueued(db) == [at("12:09"), at("12:10")]


def test_ticks_a_worker_gets_to_late_but_within_lost_after_are_each_enqueued(
    db: Database,
) -> None:
    schedule = minutely()
    runner = scheduler(db, schedule, late_s=300)
    runner.run_pass(STARTED)

    runner.run_pass(at("12:03") + dt.timedelta(seconds=20))

    assert enqueued(db) == [at("12:01"), at("12:02"), at("12:03")]


# ---------------------------------------------------------------- each tick


def test_each_tick_is_enqueued_once_however_many_schedulers_see_it(db: Database) -> None:
    schedule = minutely()
    runners = [scheduler(db, schedule) for _ in range(3)]
    for runner in runners:
        runner.run_pass(STARTED)

    for runner in runners:
        runner.run_pass(at("12:02"))

    assert enqueued(db) == [at("12:01"), at("12:02")]
    assert [job_id is not None for _, job_id in ticks(db, "every-minute")] == [True, True]


def test_a_ticks_job_has_the_schedules_arguments_and_the_tick_as_its_due_time(
    db: Database,
) -> None:
    schedule = minutely(queue="reports", priority=3)
    runner = scheduler(db, schedule)
    runner.run_pass(STARTED)
    runner.run_pass(at("12:01"))

    ((tick, job_id),) = ticks(db, "every-minute")
    assert job_id is not None
    row = get_row(db, job_id)
    assert (tick, row.run_at, row.args) == (at("12:01"), at("12:01"), {"n": 7})
    assert (row.name, row.queue, row.priority) == ("sc.minutely", "reports", 3)


def test_a_unique_job_still_queued_takes_the_next_tick_without_a_second_job(
    db: Database,
) -> None:
    schedule = minutely(unique=True)
    runner = scheduler(db, schedule)
    runner.run_pass(STARTED)

    runner.run_pass(at("12:02"))

    (first, second) = ticks(db, "every-minute")
    assert first[1] == second[1] and first[1] is not None
    assert enqueued(db) == [at("12:01")]


def test_old_ticks_are_pruned_keeping_the_latest_of_each_schedule(db: Database) -> None:
    schedule = minutely()
    for minute in range(5):
        seed_last_tick(db, schedule, at(f"11:0{minute}"))

    deleted = storage.schedule_ticks_prune(db, {"every-minute": 2, "other": 2}, before=NOON)

    assert deleted == 3
    assert [t for t, _ in ticks(db, "every-minute")] == [at("11:03"), at("11:04")]
    assert storage.schedule_last_ticks(db, ["every-minute", "other"]) == {
        "every-minute": at("11:04")
    }


def test_pruning_keeps_recent_ticks_however_many(db: Database) -> None:
    schedule = minutely()
    for minute in range(5):
        seed_last_tick(db, schedule, at(f"11:0{minute}"))

    storage.schedule_ticks_prune(db, {"every-minute": 1}, before=at("11:02"))

    assert [t for t, _ in ticks(db, "every-minute")] == [at(f"11:0{m}") for m in (2, 3, 4)]


def test_a_scheduler_keeps_the_ticks_its_catch_up_could_try_again(db: Database) -> None:
    schedule = minutely(catch_up=3)
    for minute in range(_scheduler.KEEP_TICKS + 10):
        tick = at("08:00") + minute * dt.timedelta(minutes=1)
        seed_last_tick(db, schedule, tick)

    scheduler(db, schedule).prune(NOON)

    assert len(ticks(db, "every-minute")) == _scheduler.KEEP_TICKS + 3


# ----------------------------------------------------------------- workers


def test_a_running_worker_enqueues_each_tick_as_it_comes(db: Database) -> None:
    @periodic("* * * * * *")
    @job(name="sc.every_second", queue="elsewhere")
    def every_second() -> None: ...

    with BackgroundWorker(FAST):
        wait_for(lambda: len(enqueued(db, "sc.every_second")) >= 2, timeout=10)

    times = enqueued(db, "sc.every_second")
    assert times[1] - times[0] == SECOND


def test_a_worker_schedules_only_the_jobs_it_has_registered(db: Database) -> None:
    @periodic("* * * * *", name="forgotten")
    @job(name="sc.forgotten")
    def forgotten() -> None: ...

    _registry.unregister("sc.forgotten")
    schedule = minutely()

    running = _scheduler.start(Worker(FAST))
    assert running is not None
    try:
        assert [s.name for s in running.schedules] == [schedule.name]
    finally:
        running.stop()


def test_a_worker_with_schedules_off_starts_no_scheduler(db: Database) -> None:
    minutely()

    assert _scheduler.start(Worker(WorkerSettings(schedules=False))) is None


def test_tasklet_worker_no_schedules_turns_the_scheduler_off() -> None:
    parser = cli._parser()

    assert parser.parse_args(["worker"]).schedules is True
    assert parser.parse_args(["worker", "--no-schedules"]).schedules is False


def test_a_worker_that_drains_does_not_schedule(db: Database) -> None:
    @periodic("* * * * * *")
    @job(name="sc.every_second")
    def every_second() -> None: ...

    worker = Worker(FAST)
    worker.run_sync(drain=True)

    assert enqueued(db) == []


# --------------------------------------------------------------- processes


def _contiguous(times: list[dt.datetime]) -> bool:
    return all(b - a == SECOND for a, b in itertools.pairwise(times))


def _output(process: subprocess.Popen[bytes]) -> str:
    """What a worker process has logged so far (tests.support writes it to a file)."""
    return Path(support._outputs[process.pid].name).read_text()


def _registered_workers(db: Database) -> int:
    with db.begin(read_only=True) as conn:
        query = sa.select(sa.func.count()).select_from(workers)
        return int(conn.execute(query, execution_options=db.execution_options).scalar_one())


@pytest.mark.slow
def test_five_worker_processes_enqueue_each_tick_once_and_four_killed_leave_no_gap(
    backend: Backend, db: Database, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    args = ("worker", "-q", "work", "--import", "tests.schedule_jobs", "--heartbeat", "0.2")
    processes.extend(tasklet_process(backend, log, *args, "--lost-after", "1") for _ in range(5))
    wait_for(lambda: _registered_workers(db) == 5, timeout=60)
    all_up = storage.utcnow()
    wait_for(lambda: sum(t > all_up for t in enqueued(db)) >= 3, timeout=30)

    # The survivor is the worker that enqueued the fewest ticks so far: the others,
    # which did the work, are killed.
    survivor = min(processes, key=lambda p: _output(p).count("tests.every-second': job"))
    for victim in processes:
        if victim is not survivor:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
    killed = storage.utcnow()
    wait_for(lambda: sum(t > killed for t in enqueued(db)) >= 3, timeout=30)
    survivor.send_signal(signal.SIGTERM)
    code, output = finish(survivor)

    assert code == 0, output
    times = enqueued(db, "tests.schedule.tick")
    recorded = ticks(db, SCHEDULE_OF_PROCESSES)
    assert _contiguous(times), times
    assert times == [t for t, _ in recorded]
    assert len({job_id for _, job_id in recorded}) == len(recorded)
