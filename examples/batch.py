"""Defer a batch of jobs in one round trip, then wait for every result.

    python examples/batch.py                # runs a worker in a thread of this process
    python examples/batch.py --no-worker    # jobs run on a worker started elsewhere:
                                            #   tasklet worker -q batch --import batch_jobs

Each ``handle.result()`` waits for its job's final state: on PostgreSQL it is
woken by a notification when the job finishes, on SQLite it watches the
database file. A job that failed for good raises ``tasklet.JobFailed``.
"""

from __future__ import annotations

import argparse
import time

from batch_jobs import count_words

import tasklet


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
    deadline = started + options.timeout
    words, failed = 0, []
    try:
        for handle in handles:
            try:
                words += handle.result(timeout=max(0.0, deadline - time.monotonic()))["words"]
            except tasklet.JobFailed as error:
                failed.append((handle.id, error.error))
            except TimeoutError:
                raise SystemExit(f"job {handle.id} unfinished after {options.timeout:g}s") from None
    finally:
        if worker is not None:
            worker.stop()

    seconds = time.monotonic() - started
    print(f"{len(handles) - len(failed)} succeeded, {len(failed)} failed in {seconds:.2f}s")
    print(f"total words: {words}")
    if failed:
        raise SystemExit(f"failed jobs: {failed}")


if __name__ == "__main__":
    main()
