"""Job definitions for tests that run jobs in other processes (workers, concurrent writers).

Import it as ``tests.jobs_for_tests``. Every job has an explicit, stable name, so
any process that imports this module registers the same job types.
"""

from __future__ import annotations

from tasklet import job


@job(name="tests.noop")
def noop(n: int = 0) -> None:
    """Does nothing: for enqueue and concurrency tests."""


@job(name="tests.add")
def add(a: int, b: int) -> int:
    return a + b


@job(name="tests.echo")
def echo(value: object) -> object:
    return value
