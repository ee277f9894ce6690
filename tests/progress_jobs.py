"""Jobs for the workoff progress tests; import as ``tests.progress_jobs``."""

from __future__ import annotations

from tasklet import job


@job(name="tests.progress.ok")
def ok(n: int) -> int:
    return n


@job(name="tests.progress.fail", max_attempts=1)
def fail(n: int) -> None:
    raise ValueError(f"failure {n}")
