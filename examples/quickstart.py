"""tasklet's quick start: define jobs, defer them, run a worker until they are done.

    python examples/quickstart.py                      # SQLite file ./tasklet.db
    TASKLET_DATABASE_URL=postgresql://localhost/app python examples/quickstart.py

In a real project the jobs live in a module named in pyproject.toml
(``[tool.tasklet] imports = ["myapp.jobs"]``) and ``tasklet worker`` runs them;
here the script defers the jobs and then runs a worker in-process with
``workoff`` semantics (run what is due, then stop).
"""

from __future__ import annotations

# The jobs live in a module, as they would in an application (next to this script,
# so importable when it runs).
from quickstart_jobs import fetch_profile, send_welcome, shaky

import tasklet


def main() -> None:
    tasklet.upgrade()  # the same as `tasklet migrate`: creates the tables if needed

    handles = [
        send_welcome.defer(user_id=5),
        fetch_profile.defer(user_id=5),
        shaky.defer(),
        *send_welcome.defer_many([{"user_id": n} for n in (6, 7)]),
    ]
    print(f"deferred {len(handles)} jobs: {[h.id for h in handles]}")

    stats = tasklet.Worker(tasklet.WorkerSettings(queues=("email", "default"))).run_sync(drain=True)
    print(f"worker finished: {dict(stats.outcomes)}")

    for handle in handles:
        row = tasklet.get_job(handle.id)
        assert row is not None
        attempts = [(run.attempt, run.outcome, run.result) for run in tasklet.get_runs(handle.id)]
        print(f"job {row.id} {row.name}: {row.status}; attempts {attempts}")


if __name__ == "__main__":
    main()
