"""Recurring jobs: ``@periodic`` stacked on a ``@job`` enqueues it at every tick of a cron.

>>> from tasklet import job, periodic
>>> @periodic("0 7 * * mon-fri", timezone="Europe/Paris", kwargs={"kind": "daily"})
... @periodic("0 8 1 * *", kwargs={"kind": "monthly"})
... @job(queue="reports")
... def send_report(kind: str) -> None: ...

Every running worker that knows the job schedules it (see ``tasklet._scheduler``);
the ``schedule_ticks`` table makes each tick one job, however many workers run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from croniter import CroniterError, croniter

from . import _codec, _registry
from .errors import JobDefinitionError, SerializationError

if TYPE_CHECKING:
    from . import storage
    from ._job import Job

__all__ = ["Schedule", "periodic"]

UTC = dt.UTC
J = TypeVar("J", bound="Job[Any, Any]")
_JUST_BEFORE = dt.timedelta(microseconds=1)


@dataclass(frozen=True, eq=False)
class Schedule:
    """One recurring schedule of a job: when it ticks, and with which arguments."""

    #: Identifies the schedule in ``schedule_ticks``; stable across processes and restarts.
    name: str
    job: Job[Any, Any] = field(repr=False)
    #: Five fields (minute hour day month weekday), or six with seconds last.
    cron: str
    timezone: dt.tzinfo
    kwargs: Mapping[str, Any]
    #: Of the ticks missed while no worker was scheduling, how many of the latest to run.
    catch_up: int

    def next_after(self, when: dt.datetime) -> dt.datetime:
        """The first tick strictly after ``when``, in UTC."""
        return _utc(croniter(self.cron, when.astimezone(self.timezone)).get_next(dt.datetime))

    def due(
        self, after: dt.datetime, live_from: dt.datetime, now: dt.datetime
    ) -> list[dt.datetime]:
        """The ticks to enqueue among those in (``after``, ``now``], oldest first.

        Ticks from ``live_from`` on are on time: each one. Earlier ones were
        missed (no worker was scheduling then): only the latest ``catch_up``.
        """
        ticks: list[dt.datetime] = []
        if self.catch_up and after < live_from:
            backwards = croniter(self.cron, live_from.astimezone(self.timezone))
            while len(ticks) < self.catch_up:
                tick = _utc(backwards.get_prev(dt.datetime))
                if tick <= after:
                    break
                ticks.append(tick)
            ticks.reverse()
        start = max(after, live_from - _JUST_BEFORE)
        forwards = croniter(self.cron, start.astimezone(self.timezone))
        while (tick := _utc(forwards.get_next(dt.datetime))) <= now:
            ticks.append(tick)
        return ticks

    def new_row(self, tick: dt.datetime) -> storage.NewJob:
        """The job this tick enqueues: due at the tick, with the schedule's arguments."""
        return self.job.row_at(tick, self.kwargs)


_lock = threading.Lock()
_schedules: dict[str, Schedule] = {}


def periodic(
    cron: str,
    *,
    timezone: str | dt.tzinfo | None = None,
    kwargs: Mapping[str, Any] | None = None,
    name: str | None = None,
    catch_up: int = 1,
) -> Callable[[J], J]:
    """Enqueue the job below at every tick of ``cron``; stack it above ``@job``, as often as needed.

    ``cron`` has five fields (``"*/5 * * * *"``: every five minutes) or six,
    the sixth being seconds (``"* * * * * */10"``: every ten seconds), read
    in ``timezone`` (a zoneinfo name; default UTC). ``kwargs`` are the job's
    arguments. ``name`` identifies the schedule in the database (default: the
    job's name, the cron, the timezone and a hash of ``kwargs``); changing it,
    or what the default is made of, starts a new schedule.

    ``catch_up``: ticks that came while no worker was scheduling (a deploy,
    an outage) are missed; by default the latest of them runs once when a
    worker starts; ``0`` skips them; ``n`` runs up to the ``n`` latest.
    """
    tz = _timezone(timezone)
    expression = " ".join(str(cron).split())
    if not croniter.is_valid(expression):
        raise JobDefinitionError(
            f"{cron!r} is not a cron expression: give five fields (minute hour day month "
            "weekday, e.g. '*/5 * * * *') or six with seconds last ('* * * * * */10')"
        )
    try:
        croniter(expression, dt.datetime.now(tz)).get_next(dt.datetime)
    except CroniterError as exc:  # valid syntax, but no date matches (e.g. 30 February)
        raise JobDefinitionError(f"cron {cron!r} never ticks: {exc}") from None
    if isinstance(catch_up, bool) or not isinstance(catch_up, int) or catch_up < 0:
        raise JobDefinitionError(f"catch_up must be an int >= 0, not {catch_up!r}")
    arguments = dict(kwargs or {})

    def decorate(job: J) -> J:
        from ._job import Job

        if not isinstance(job, Job):
            raise JobDefinitionError(
                f"@periodic schedules a job: stack it above @job, not on {job!r}"
            )
        _check_arguments(job, arguments)
        schedule = Schedule(
            name=name or _default_name(job.name, expression, tz, arguments),
            job=job,
            cron=expression,
            timezone=tz,
            kwargs=arguments,
            catch_up=catch_up,
        )
        _register(schedule)
        return job

    return decorate


def registered() -> list[Schedule]:
    """The schedules of the jobs this process has registered, by name."""
    with _lock:
        schedules = list(_schedules.values())
    return sorted(
        (s for s in schedules if _registry.get(s.job.name) is s.job), key=lambda s: s.name
    )


def _register(schedule: Schedule) -> None:
    with _lock:
        existing = _schedules.get(schedule.name)
        # The same job defined again (a module reloaded) replaces its schedules.
        if (
            existing is not None
            and existing.job.name != schedule.job.name
            and _registry.get(existing.job.name) is existing.job
        ):
            raise JobDefinitionError(
                f"two schedules are named {schedule.name!r}: of {existing.job.name!r} and "
                f"of {schedule.job.name!r}; give one of them another name with "
                "@periodic(name=...)"
            )
        _schedules[schedule.name] = schedule


def _timezone(timezone: str | dt.tzinfo | None) -> dt.tzinfo:
    if timezone is None:
        return UTC
    if isinstance(timezone, dt.tzinfo):
        return timezone
    try:
        return zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
        raise JobDefinitionError(
            f"unknown timezone {timezone!r}: give a zoneinfo name such as 'Europe/Paris' "
            "(on a system without time zone data, pip install tzdata)"
        ) from None


def _check_arguments(job: Job[Any, Any], kwargs: Mapping[str, Any]) -> None:
    try:
        job.bind((), kwargs)
        if job.serializer == "json":
            _codec.encode_json(kwargs, None)
    except (TypeError, SerializationError) as exc:
        raise JobDefinitionError(f"@periodic kwargs for {job.name}: {exc}") from None


def _default_name(job_name: str, cron: str, tz: dt.tzinfo, kwargs: Mapping[str, Any]) -> str:
    name = f"{job_name} {cron}"
    if tz is not UTC:
        name += f" {getattr(tz, 'key', None) or tz}"
    if kwargs:
        try:
            text = json.dumps(_codec.encode_json(kwargs, None), sort_keys=True)
        except SerializationError:
            raise JobDefinitionError(
                f"@periodic kwargs for {job_name} are not JSON, so they cannot name the "
                "schedule the same way in every process: pass @periodic(name=...)"
            ) from None
        name += f" {hashlib.sha256(text.encode()).hexdigest()[:12]}"
    return name


def _utc(value: dt.datetime) -> dt.datetime:
    return value.astimezone(UTC)
