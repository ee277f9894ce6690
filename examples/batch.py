"""Defer a batch of jobs in one round trip, then wait until every one has finished.

    python examples/batch.py                # runs a worker in a thread of this process
    python examples/batch.py --no-worker    # jobs run on a worker started elsewhere:
                                            #   tasklet worker -q batch --import batch_jobs

It polls ``tasklet.get_job`` for each job until all are finished, then reads
each job's result from its last recorded attempt (``tasklet.get_runs``).
"""

from __future__ import annotations

import argparse
import time

from batch_jobs import count_words

import tasklet

FINISHED = {"succeeded", "failed", "cancelled"}


def wait_for_all(ids: list[int], timeout: float) -> list[tasklet.JobRow]:
    """The finished rows of these jobs, once none is queued or running any more."""
    deadline = time.monotonic() + timeout
    pending, done = list(ids), {}
    while pending:
        for job_id in pending:
            row = tasklet.get_job(job_id)
            if row is not None and row.status in FINISHED:
                done[job_id] = row
        pending = [job_id for job_id in pending if job_id not in done]
        if pending and time.monotonic() > deadline:
            raise SystemExit(f"{len(pending)} of {len(ids)} jobs unfinished after {timeout:g}s")
        if pending:
            time.sleep(0.1)
    return [done[job_id] for job_id in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-worker", action="store_true", help="a worker runs elsewhere")
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=60)
    options = parser.parse_args()

    tasklet.upgrade()  # `tasklet migrate`, for a self-contained example
    documents = [{"document_id": n, "text": "lorem ipsum " * n} for n in range(options.documents)]
    started = time.monotonic()
    handles = count_words.defer_many(documents)  # every row checked, then one INSERT
    print(f"deferred {len(handles)} jobs in one round trip")

    worker = None if options.no_worker else tasklet.start_in_thread()
    try:
        rows = wait_for_all([h.id for h in handles], options.timeout)
    finally:
        if worker is not None:
            worker.stop()

    failed = [row.id for row in rows if row.status != "succeeded"]
    succeeded = [row.id for row in rows if row.status == "succeeded"]
    words = sum(tasklet.get_runs(job_id)[-1].result["words"] for job_id in succeeded)
    seconds = time.monotonic() - started
    print(f"{len(succeeded)} succeeded, {len(failed)} failed in {seconds:.2f}s")
    print(f"total words: {words}")
    if failed:
        raise SystemExit(f"failed jobs: {failed}")


if __name__ == "__main__":
    main()
