"""The recurring job of examples/cron.py. Workers import it with ``--import cron_jobs``."""

from __future__ import annotations

from tasklet import JobContext, job, periodic

#: What the job saw, for the example to print (a real job would send the report).
ticks: list[str] = []


# Every two seconds, for the demo; a real one might say "0 7 * * mon-fri".
@periodic("* * * * * */2", name="example-digest", kwargs={"kind": "digest"})
@job(queue="cron", unique=True)  # a slow run never piles up behind the next tick
def send_digest(ctx: JobContext, kind: str) -> str:
    assert ctx.scheduled_at is not None
    ticks.append(ctx.scheduled_at.isoformat(timespec="seconds"))
    return f"{kind} for {ctx.scheduled_at:%H:%M:%S}"
