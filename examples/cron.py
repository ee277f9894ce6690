"""A recurring job: every worker schedules it, and each tick runs exactly once.

    python examples/cron.py               # a worker in this process, for three ticks
    tasklet worker -q cron --import cron_jobs   # what production runs (as many as you like)

The schedule lives on the job (``@periodic`` in cron_jobs.py). Start several
workers and each tick still becomes one job: the tick's row in
``schedule_ticks`` has a primary key of (schedule, tick).
"""

from __future__ import annotations

import argparse
import time

from cron_jobs import ticks

import tasklet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=30)
    options = parser.parse_args()

    tasklet.upgrade()  # `tasklet migrate`, for a self-contained example
    worker = tasklet.start_in_thread(tasklet.WorkerSettings(queues=("cron",)))
    deadline = time.monotonic() + options.timeout
    try:
        while len(ticks) < options.ticks:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(ticks)} ticks ran in {options.timeout:g}s")
            time.sleep(0.05)  # the ticks come every two seconds
    finally:
        worker.stop()
    print(f"ran {len(ticks)} ticks, once each: {', '.join(ticks)}")


if __name__ == "__main__":
    main()
