"""Enqueue-to-start latency of an idle tasklet worker, printed (never asserted).

    python bench/latency.py                     # PostgreSQL at $TASKLET_BENCH_URL
    TASKLET_BENCH_URL=sqlite:////tmp/lat.db python bench/latency.py

A worker process starts and goes idle; then N jobs are deferred one at a time,
10 ms apart. Each job records ``time.time() - t``, where ``t`` was taken just
before its defer call, so the figure includes the enqueue commit and the
wake-up (NOTIFY on PostgreSQL, the WAL check on SQLite).
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
import uuid

import sqlalchemy as sa

import tasklet

URL = os.environ.get("TASKLET_BENCH_URL", "postgresql://postgres@127.0.0.1:5432/test")
N = int(os.environ.get("BENCH_LAT_N", "300"))
SPACING_S = 0.010

_latencies: multiprocessing.Queue[float] | None = None


@tasklet.job(name="bench.latency.probe", queue="latency")
def probe(t: float) -> None:
    assert _latencies is not None
    _latencies.put(time.time() - t)


def _worker(url: str, schema: str | None, latencies: multiprocessing.Queue[float]) -> None:
    global _latencies
    _latencies = latencies
    tasklet.configure(url, schema=schema)
    tasklet.Worker(tasklet.WorkerSettings(queues=("latency",))).run_sync(handle_signals=True)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def main() -> None:
    is_postgres = URL.startswith("postgres")
    schema = f"bench_{uuid.uuid4().hex[:8]}" if is_postgres else None
    tasklet.configure(URL, schema=schema)
    tasklet.upgrade()
    latencies: multiprocessing.Queue[float] = multiprocessing.get_context("spawn").Queue()
    worker = multiprocessing.get_context("spawn").Process(
        target=_worker, args=(URL, schema, latencies)
    )
    worker.start()
    try:
        probe.defer(t=time.time())
        latencies.get(timeout=30)  # the worker is up and has run one job
        time.sleep(1.5)  # let it go idle, as the peer benchmark does
        calls = []
        results = []
        for _ in range(N):
            t = time.time()
            probe.defer(t=t)
            calls.append(time.time() - t)
            time.sleep(max(0.0, SPACING_S - (time.time() - t)))
        for _ in range(N):
            results.append(latencies.get(timeout=30))
    finally:
        worker.terminate()
        worker.join(30)
        if schema is not None:
            engine = sa.create_engine(URL.replace("postgresql://", "postgresql+psycopg://"))
            with engine.begin() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            engine.dispose()
    ms = [r * 1000 for r in results]
    print(
        f"tasklet latency on {URL.split('@')[-1]}: n={len(ms)} "
        f"p50={_percentile(ms, 0.5):.2f}ms p95={_percentile(ms, 0.95):.2f}ms "
        f"p99={_percentile(ms, 0.99):.2f}ms max={max(ms):.2f}ms mean={statistics.mean(ms):.2f}ms; "
        f"defer call p50={_percentile([c * 1000 for c in calls], 0.5):.2f}ms"
    )


if __name__ == "__main__":
    main()
