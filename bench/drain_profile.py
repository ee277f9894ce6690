"""Where a drain's time goes: the claims, the event loop's work between them, the CPU.

    python bench/drain_profile.py               # PostgreSQL at $TASKLET_BENCH_URL
    TASKLET_BENCH_URL=sqlite:////tmp/drain.db python bench/drain_profile.py
    BENCH_N=100000 BENCH_CONCURRENCY=10 python bench/drain_profile.py

Fills the queue with N no-op async jobs, then drains it in this process with a
default worker (``workoff``). Every claim is timed where the worker calls it;
between one claim's return and the next claim's start the event loop runs the
jobs it got (and settles them), so the gaps are the worker's Python per job.
Finishes run in a thread beside both. CPU time is split between this process
and the rest of the machine (on a local server: PostgreSQL). Figures are
printed, never asserted; run it a few times, since this machine is noisy.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid

import sqlalchemy as sa

import tasklet
from tasklet.storage import ClaimedJob, attempts

URL = os.environ.get("TASKLET_BENCH_URL", "postgresql://postgres@127.0.0.1:5432/test")
N = int(os.environ.get("BENCH_N", "20000"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "100"))


@tasklet.job(name="bench.profile.noop")
async def noop(t: float) -> None:
    pass


def _machine_cpu_s() -> float:
    """CPU seconds all cores have spent busy since boot (Linux)."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def main() -> None:
    is_postgres = URL.startswith("postgres")
    schema = f"bench_{uuid.uuid4().hex[:8]}" if is_postgres else None
    tasklet.configure(URL, schema=schema)
    tasklet.upgrade()
    try:
        noop.defer_many([{"t": float(i)} for i in range(N)])
        if is_postgres:
            with sa.create_engine(URL).connect() as conn:
                conn.exec_driver_sql("CHECKPOINT")

        claims: list[tuple[float, float, int]] = []  # start, end, jobs
        claim = attempts.Claimer.claim_async

        async def timed_claim(
            self: attempts.Claimer, limit: int, *, lost_below: int | None = None
        ) -> list[ClaimedJob]:
            began = time.perf_counter()
            rows = await claim(self, limit, lost_below=lost_below)
            claims.append((began, time.perf_counter(), len(rows)))
            return rows

        attempts.Claimer.claim_async = timed_claim  # type: ignore[method-assign]
        machine, own = _machine_cpu_s(), _own_cpu_s()
        began = time.perf_counter()
        stats = tasklet.Worker(tasklet.WorkerSettings(concurrency=CONCURRENCY)).run_sync(drain=True)
        wall = time.perf_counter() - began
        machine, own = _machine_cpu_s() - machine, _own_cpu_s() - own
        attempts.Claimer.claim_async = claim  # type: ignore[method-assign]
    finally:
        if schema is not None:
            with sa.create_engine(URL).begin() as conn:
                conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")

    assert stats.outcomes["succeeded"] == N, stats.outcomes
    claiming = [end - start for start, end, _ in claims]
    gaps = [claims[i + 1][0] - claims[i][1] for i in range(len(claims) - 1)]
    print(
        f"{URL.split(':')[0]}: drained {N} jobs in {wall:.3f}s = {N / wall:,.0f} jobs/s "
        f"(concurrency {CONCURRENCY})"
    )
    print(
        f"claims: {len(claims)}, {sum(claiming):.3f}s in all, "
        f"median {statistics.median(claiming) * 1000:.2f} ms for "
        f"{statistics.median(n for _, _, n in claims):.0f} jobs"
    )
    print(f"event loop between claims: {sum(gaps):.3f}s in all, {sum(gaps) / N * 1e6:.1f} µs a job")
    print(
        f"CPU: this process {own:.2f}s ({own / N * 1e6:.0f} µs a job), rest of the machine "
        f"{machine - own:.2f}s ({(machine - own) / N * 1e6:.0f} µs a job), "
        f"of {wall * (os.cpu_count() or 1):.2f}s the cores had"
    )


if __name__ == "__main__":
    main()
