"""How tasklet's figures change as the work grows (PostgreSQL), printed, never asserted.

    python bench/growth.py            # TASKLET_BENCH_URL, default the local `test` database

1. Drain with 20k and with 200k jobs queued: jobs/s, and the worker's peak RSS.
2. With 1 million finished jobs (and their job_runs rows) left in the tables:
   enqueue one by one, and drain 20k.
3. 1, 2 and 4 worker processes draining one queue of 40k jobs.

Every drain runs ``tasklet workoff`` semantics (run what is due, then exit) in
fresh processes with tasklet's default settings; no-op async jobs.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import time
import uuid

import sqlalchemy as sa

import tasklet

URL = os.environ.get("TASKLET_BENCH_URL", "postgresql://postgres@127.0.0.1:5432/test")

WORKER = """
import resource, sys, time, tasklet
@tasklet.job(name="bench.growth.noop")
async def noop(t: float) -> None: ...
tasklet.configure(sys.argv[1], schema=sys.argv[2])
print(time.time(), flush=True)
tasklet.Worker().run_sync(drain=True)
print(time.time(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


@tasklet.job(name="bench.growth.noop")
async def noop(t: float) -> None: ...


def engine() -> sa.Engine:
    return sa.create_engine(URL.replace("postgresql://", "postgresql+psycopg://"))


def fresh_schema() -> str:
    schema = f"growth_{uuid.uuid4().hex[:8]}"
    tasklet.configure(URL, schema=schema)
    tasklet.upgrade()
    return schema


def drop(schema: str) -> None:
    tasklet.configure()
    with engine().begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def queue(n: int) -> None:
    for start in range(0, n, 10_000):
        noop.defer_many([{"t": 0.0}] * min(10_000, n - start))
    with engine().connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("CHECKPOINT")


def drain(schema: str, processes: int = 1) -> tuple[float, float]:
    """Seconds from the first worker's start to the last one's end, and peak RSS in MiB."""
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, URL, schema], stdout=subprocess.PIPE, text=True
        )
        for _ in range(processes)
    ]
    stamps = [w.communicate()[0].split() for w in workers]
    if any(w.returncode for w in workers):
        raise SystemExit("a worker failed")
    seconds = max(float(s[1]) for s in stamps) - min(float(s[0]) for s in stamps)
    rss_mib = max(int(s[2]) for s in stamps) / 1024
    return seconds, rss_mib


def add_finished(schema: str, n: int) -> None:
    """n succeeded jobs with one job_runs row each, as a long-running system accumulates."""
    with engine().begin() as conn:
        conn.exec_driver_sql(f'SET LOCAL search_path TO "{schema}"')
        conn.exec_driver_sql(
            "INSERT INTO jobs (name, queue, priority, status, serializer, args, attempts,"
            " max_attempts, lost_count, run_at, created_at, started_at, finished_at, lease)"
            " SELECT 'bench.growth.noop', 'default', 0, 'succeeded', 'json', '{\"t\": 0}', 1,"
            " 20, 0, now(), now(), now(), now(), 1 FROM generate_series(1, %(n)s)",
            {"n": n},
        )
        conn.exec_driver_sql(
            "INSERT INTO job_runs (job_id, attempt, worker_id, outcome, started_at, finished_at)"
            " SELECT id, 1, 'w', 'succeeded', now(), now() FROM jobs WHERE status = 'succeeded'"
        )
    with engine().connect() as conn:
        auto = conn.execution_options(isolation_level="AUTOCOMMIT")
        auto.exec_driver_sql(f'VACUUM ANALYZE "{schema}".jobs')
        auto.exec_driver_sql(f'VACUUM ANALYZE "{schema}".job_runs')
        auto.exec_driver_sql("CHECKPOINT")


def enqueue_rate(n: int = 3000) -> float:
    start = time.perf_counter()
    for _ in range(n):
        noop.defer(t=0.0)
    return n / (time.perf_counter() - start)


def main() -> None:
    print(f"tasklet {importlib.metadata.version('tasklet')} growth on {URL.split('@')[-1]}")
    for n in (20_000, 200_000):
        schema = fresh_schema()
        queue(n)
        seconds, rss = drain(schema)
        print(f"drain {n:>7} queued: {n / seconds:8.0f} jobs/s, worker peak RSS {rss:.0f} MiB")
        drop(schema)

    schema = fresh_schema()
    rate_empty = enqueue_rate()
    drop(schema)
    schema = fresh_schema()
    add_finished(schema, 1_000_000)
    rate_full = enqueue_rate()
    with engine().begin() as conn:  # the probe jobs above must not count in the drain
        conn.exec_driver_sql(f"DELETE FROM \"{schema}\".jobs WHERE status = 'queued'")
    queue(20_000)
    seconds, _ = drain(schema)
    print(
        f"enqueue 1-by-1: {rate_empty:.0f} jobs/s on empty tables, {rate_full:.0f} jobs/s with "
        f"1M finished jobs; drain 20k beside 1M finished: {20_000 / seconds:.0f} jobs/s"
    )
    drop(schema)

    for processes in (1, 2, 4):
        schema = fresh_schema()
        queue(40_000)
        seconds, _ = drain(schema, processes)
        print(f"drain 40k with {processes} worker process(es): {40_000 / seconds:8.0f} jobs/s")
        drop(schema)


if __name__ == "__main__":
    main()
