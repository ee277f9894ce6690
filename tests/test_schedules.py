"""``@periodic``: declaring schedules, and which of their ticks are due."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from tasklet import JobDefinitionError, _registry, job, periodic, schedules
from tasklet.schedules import Schedule

UTC = dt.UTC
NOON = dt.datetime(2026, 6, 1, 12, 0, 30, tzinfo=UTC)


def at(hh_mm: str, day: int = 1) -> dt.datetime:
    hours, minutes = map(int, hh_mm.split(":"))
    return dt.datetime(2026, 6, day, hours, minutes, tzinfo=UTC)


def only(name: str) -> Schedule:
    (schedule,) = [s for s in schedules.registered() if s.job.name == name]
    return schedule


def every_minute(catch_up: int = 1) -> Schedule:
    @periodic("* * * * *", catch_up=catch_up)
    @job(name="s.minutely")
    def minutely() -> None: ...

    return only("s.minutely")


# ----------------------------------------------------------------- declaring


def test_periodic_stacked_on_a_job_registers_a_schedule_and_returns_the_job() -> None:
    @job(name="s.report")
    def report(kind: str) -> None: ...

    decorated = periodic("*/5 * * * *", kwargs={"kind": "daily"})(report)

    schedule = only("s.report")
    assert decorated is report
    assert (schedule.cron, schedule.kwargs, schedule.catch_up) == (
        "*/5 * * * *",
        {"kind": "daily"},
        1,
    )
    assert schedule.timezone is UTC


def test_a_job_may_have_several_schedules_each_with_its_own_name() -> None:
    @periodic("0 7 * * *", kwargs={"kind": "daily"})
    @periodic("0 8 1 * *", kwargs={"kind": "monthly"})
    @job(name="s.report")
    def report(kind: str) -> None: ...

    names = [s.name for s in schedules.registered() if s.job is report]
    assert len(names) == 2 and len(set(names)) == 2


def test_the_default_name_is_the_same_in_every_process_for_the_same_schedule() -> None:
    @periodic("*/5  * * * *", timezone="Europe/Paris", kwargs={"b": 2, "a": 1})
    @job(name="s.named")
    def named(a: int, b: int) -> None: ...

    name = only("s.named").name
    assert name.startswith("s.named */5 * * * * Europe/Paris ")
    assert name == "s.named */5 * * * * Europe/Paris " + name.rsplit(" ", 1)[1]
    # The hash covers the arguments, in any order: a second declaration gives the same name.
    _registry.unregister("s.named")

    @periodic("*/5 * * * *", timezone="Europe/Paris", kwargs={"a": 1, "b": 2})
    @job(name="s.named")
    def again(a: int, b: int) -> None: ...

    assert only("s.named").name == name


def test_a_schedule_of_a_job_no_longer_registered_is_not_scheduled() -> None:
    every_minute()
    _registry.unregister("s.minutely")

    assert [s for s in schedules.registered() if s.job.name == "s.minutely"] == []


def test_two_jobs_cannot_share_a_schedule_name() -> None:
    @periodic("* * * * *", name="nightly")
    @job(name="s.one")
    def one() -> None: ...

    with pytest.raises(JobDefinitionError, match="nightly"):

        @periodic("* * * * *", name="nightly")
        @job(name="s.two")
        def two() -> None: ...


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        ({"cron": "every minute"}, "cron expression"),
        ({"cron": "0 0 30 2 *"}, "never ticks"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "timezone"),
        ({"cron": "* * * * *", "catch_up": -1}, "catch_up"),
        ({"cron": "* * * * *", "kwargs": {"nope": 1}}, "nope"),
        ({"cron": "* * * * *", "kwargs": {"n": object()}}, "JSON"),
    ],
    ids=["cron", "impossible-date", "timezone", "catch_up", "unknown-argument", "unencodable"],
)
def test_a_bad_schedule_is_refused_saying_what_is_wrong(
    arguments: dict[str, Any], complaint: str
) -> None:
    @job(name="s.bad")
    def bad(n: int = 0) -> None: ...

    with pytest.raises(JobDefinitionError, match=complaint):
        periodic(**arguments)(bad)


def test_periodic_on_a_plain_function_says_to_stack_it_above_job() -> None:
    def plain() -> None: ...

    with pytest.raises(JobDefinitionError, match="above @job"):
        periodic("* * * * *")(plain)  # type: ignore[type-var]


# ----------------------------------------------------------------- the ticks


def test_a_timezone_schedule_ticks_at_local_wall_time_in_summer_and_winter() -> None:
    @periodic("0 9 * * *", timezone="Europe/Paris")
    @job(name="s.paris")
    def paris() -> None: ...

    schedule = only("s.paris")
    assert schedule.next_after(at("00:00")) == at("07:00")
    assert schedule.next_after(dt.datetime(2026, 12, 1, tzinfo=UTC)) == dt.datetime(
        2026, 12, 1, 8, tzinfo=UTC
    )


def test_a_sixth_field_gives_seconds() -> None:
    @periodic("* * * * * */15")
    @job(name="s.seconds")
    def seconds() -> None: ...

    start = at("12:00")
    ticks = only("s.seconds").due(start, start, start + dt.timedelta(minutes=1))
    assert [t.second for t in ticks] == [15, 30, 45, 0]


def test_on_time_ticks_are_all_due() -> None:
    schedule = every_minute(catch_up=0)

    assert schedule.due(at("12:00"), at("12:00"), at("12:03")) == [
        at("12:01"),
        at("12:02"),
        at("12:03"),
    ]


def test_of_missed_ticks_the_latest_one_is_due_by_default() -> None:
    schedule = every_minute()

    assert schedule.due(at("10:00"), NOON, NOON) == [at("12:00")]


def test_missed_ticks_are_skipped_with_catch_up_zero() -> None:
    schedule = every_minute(catch_up=0)

    assert schedule.due(at("10:00"), NOON, NOON) == []


def test_catch_up_n_gives_the_n_latest_missed_ticks_oldest_first() -> None:
    schedule = every_minute(catch_up=3)

    assert schedule.due(at("10:00"), NOON, NOON) == [at("11:58"), at("11:59"), at("12:00")]


def test_catch_up_never_reaches_back_to_the_last_enqueued_tick() -> None:
    schedule = every_minute(catch_up=5)

    assert schedule.due(at("11:59"), NOON, NOON) == [at("12:00")]


def test_a_tick_exactly_at_the_start_of_the_live_window_is_on_time() -> None:
    schedule = every_minute(catch_up=0)

    assert schedule.due(at("11:00"), at("12:00"), at("12:00")) == [at("12:00")]
