"""A job on a per-second schedule, for tests that run schedulers in worker processes.

Import as ``tests.schedule_jobs``; its ticks go to the queue ``ticks``, which
those tests' workers do not take, so every tick's job stays in ``jobs`` to count.
"""

from __future__ import annotations

from tasklet import job, periodic

SCHEDULE = "tests.every-second"


@periodic("* * * * * *", name=SCHEDULE)
@job(name="tests.schedule.tick", queue="ticks")
def tick() -> None: ...
