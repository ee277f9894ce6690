"""A worker runs only registered jobs, and never unpickles what a job did not declare."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasklet import job, storage
from tasklet._database import Database
from tasklet.worker import Worker, WorkerSettings
from tests.faults.test_poison_input import insert_raw

pytestmark = pytest.mark.faults


class _TouchesAFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))  # creates the file if ever unpickled


def test_a_malicious_pickle_is_never_loaded_for_a_json_job(db: Database, tmp_path: Path) -> None:
    target = tmp_path / "pwned"

    @job(name="security.json_only")
    def json_only(value: int) -> None: ...

    blob = b"tasklet-pickle/3.11\n" + pickle.dumps({"value": _TouchesAFile(str(target))})
    job_id = insert_raw(
        db, name="security.json_only", serializer="pickle", args=None, args_pickle=blob
    )
    Worker(WorkerSettings()).run_sync(drain=True)

    assert not target.exists()
    row = storage.job_get(db, job_id)
    assert row is not None and row.status == "failed"


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "subprocess.run"])
def test_rows_naming_any_callable_are_never_imported_or_run(
    db: Database, tmp_path: Path, name: str
) -> None:
    target = tmp_path / "ran"
    job_id = insert_raw(db, name=name, args={"command": f"touch {target}"})
    Worker(WorkerSettings()).run_sync(drain=True)

    assert not target.exists()
    row = storage.job_get(db, job_id)
    assert row is not None and row.status == "queued" and row.attempts == 0


names = st.text(min_size=0, max_size=40)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(queue=names)
def test_any_queue_name_is_stored_exactly_or_refused_clearly(db: Database, queue: str) -> None:
    @job(name="security.any_queue")
    def anything() -> None: ...

    try:
        handle = anything.options(queue=queue).defer()
    except ValueError as exc:
        assert "queue must be" in str(exc)
        assert queue == "" or "\x00" in queue
        return
    row = storage.job_get(db, handle.id)
    assert row is not None and row.queue == queue


def test_notifications_carry_the_queue_name_never_the_arguments(pg_db: Database) -> None:
    import psycopg

    @job(name="security.secret", queue="mail")
    def secret(password: str) -> None: ...

    with psycopg.connect(pg_db.conninfo, autocommit=True) as listener:
        listener.execute(f'LISTEN "{pg_db.notify_channel}"')
        secret.defer(password="hunter2")
        payloads = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert payloads == ["mail"]
