"""What happens after an attempt fails: pure functions, and the exceptions a job may raise.

>>> from tasklet import Retry, Snooze
>>> @job
... def poll_report(report_id: int) -> None:
...     if not ready(report_id):
...         raise Snooze(30)  # come back in 30 s (does not use an attempt)
"""

from __future__ import annotations

import datetime as dt
import math
import random
from dataclasses import dataclass
from typing import Final

from ._job import Backoff

__all__ = ["Abort", "Cancel", "Retry", "Snooze", "default_backoff", "next_step"]

#: The default backoff never waits longer than this between attempts.
BACKOFF_CAP_S: Final = 3600.0
#: A snooze longer than this is refused (a date further out is a job for ``defer_at``).
SNOOZE_MAX_S: Final = 10 * 366 * 86400.0


class Retry(Exception):
    """Raise from a job to be retried after ``delay`` seconds instead of the backoff.

    The attempt counts toward ``max_attempts``; on the last attempt the job fails.
    """

    def __init__(self, delay: float = 0.0, reason: str = "") -> None:
        super().__init__(reason or f"retry in {delay}s")
        self.delay = max(0.0, float(delay))


class Abort(Exception):
    """Raise from a job to fail it now, without retrying (bad input, a permanent refusal)."""


class Snooze(Exception):
    """Raise from a job to run it again after ``seconds``, without using an attempt.

    For waiting on something outside the job (a report being built, a rate
    limit): the job goes back to the queue, due ``seconds`` from now, its attempt
    is given back, and the run is recorded as ``snoozed``. No ``after_*`` hook
    runs: the job neither succeeded nor failed. ``seconds`` may be a timedelta.
    """

    def __init__(self, seconds: float | dt.timedelta) -> None:
        value = seconds.total_seconds() if isinstance(seconds, dt.timedelta) else seconds
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise TypeError(f"Snooze() takes a number of seconds or a timedelta, not {seconds!r}")
        if value < 0:
            raise ValueError(
                f"Snooze() needs zero or more seconds, not {seconds!r}; "
                "to run the job again at once, raise Snooze(0)"
            )
        if value > SNOOZE_MAX_S:
            raise ValueError(
                f"Snooze() takes at most ten years, not {seconds!r}; "
                "defer a new job with defer_at() for a date further out"
            )
        super().__init__(f"snoozed for {value:g}s")
        self.seconds = float(value)


class Cancel(Exception):
    """The job was cancelled: it ends ``cancelled``, is not retried, and is not a failure.

    A sync job asked to stop (``ctx.cancelled`` is true) may raise it to say so;
    any job may raise it to cancel itself. ``after_failure`` hooks receive it
    (with ``ctx.will_retry`` false) when a job is cancelled while it runs.
    """

    def __init__(self, reason: str = "cancelled") -> None:
        super().__init__(reason)


def default_backoff(attempt: int) -> float:
    """Exponential: about 2, 4, 8 ... seconds after attempts 1, 2, 3 ..., capped at an hour.

    Up to 10% of jitter spreads out the retries of jobs that failed together.
    """
    base = min(BACKOFF_CAP_S, 2.0 ** min(attempt, 32))
    return base + random.uniform(0, base / 10)


def backoff_delay(backoff: Backoff | None, attempt: int) -> float:
    if backoff is None:
        return default_backoff(attempt)
    if callable(backoff):
        return max(0.0, float(backoff(attempt)))
    return float(backoff)


@dataclass(frozen=True, slots=True)
class Step:
    """The job's next state after an attempt that did not succeed.

    ``queued`` (due after ``delay_s``), ``failed`` or ``cancelled``.
    """

    status: str
    delay_s: float = 0.0

    @property
    def will_retry(self) -> bool:
        return self.status == "queued"


def next_step(
    error: BaseException,
    *,
    attempt: int,
    max_attempts: int,
    backoff: Backoff | None,
    no_retry: tuple[type[BaseException], ...] = (),
) -> Step:
    """Decide what follows a failed (or timed-out) attempt."""
    if isinstance(error, Abort) or (no_retry and isinstance(error, no_retry)):
        return Step("failed")
    if attempt >= max_attempts:
        return Step("failed")
    if isinstance(error, Retry):
        return Step("queued", error.delay)
    return Step("queued", backoff_delay(backoff, attempt))
