"""What happens after an attempt fails: pure functions, and the exceptions a job may raise.

>>> from tasklet import Retry
>>> @job
... def poll_report(report_id: int) -> None:
...     if not ready(report_id):
...         raise Retry(delay=30)  # try again in 30 s (uses an attempt)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from ._job import Backoff

__all__ = ["Abort", "Retry", "default_backoff", "next_step"]

#: The default backoff never waits longer than this between attempts.
BACKOFF_CAP_S: Final = 3600.0


class Retry(Exception):
    """Raise from a job to be retried after ``delay`` seconds instead of the backoff.

    The attempt counts toward ``max_attempts``; on the last attempt the job fails.
    """

    def __init__(self, delay: float = 0.0, reason: str = "") -> None:
        super().__init__(reason or f"retry in {delay}s")
        self.delay = max(0.0, float(delay))


class Abort(Exception):
    """Raise from a job to fail it now, without retrying (bad input, a permanent refusal)."""


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
    """The job's next state after a failed attempt: ``queued`` after ``delay_s``, or ``failed``."""

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
