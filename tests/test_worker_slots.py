"""Per-queue slots in one worker process: ``tasklet worker -q email=4 -q default=16``."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from tasklet import job, storage
from tasklet._database import Database
from tasklet.cli import _queue_slots
from tasklet.errors import TaskletError
from tasklet.worker import Worker, WorkerSettings
from tests.support import BackgroundWorker, wait_for

FAST = WorkerSettings(heartbeat_s=0.2, lost_after_s=1.0, sweep_s=0.2, grace_s=5)


class Gate:
    """Sync jobs that block until released, counting how many run at once per queue."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running: dict[str, int] = {}
        self.most: dict[str, int] = {}

    def enter(self, queue: str) -> None:
        with self.lock:
            self.running[queue] = self.running.get(queue, 0) + 1
            self.most[queue] = max(self.most.get(queue, 0), self.running[queue])

    def leave(self, queue: str) -> None:
        with self.lock:
            self.running[queue] -= 1


def test_a_flood_on_one_queue_does_not_starve_a_queue_with_slots_of_its_own(
    db: Database,
) -> None:
    gate = Gate()
    email_ran = threading.Event()

    @job(name="slots.bulk", queue="bulk")
    def bulk() -> None:
        gate.enter("bulk")
        try:
            assert gate.release.wait(30), "the test never released the bulk jobs"
        finally:
            gate.leave("bulk")

    @job(name="slots.email", queue="email")
    def email() -> None:
        email_ran.set()

    bulk.defer_many([{}] * 10)
    email.defer()
    settings = replace(FAST, queue_slots={"bulk": 2, "email": 1})
    with BackgroundWorker(settings):
        assert email_ran.wait(10), "the email job waited behind the bulk flood"
        wait_for(lambda: gate.running.get("bulk") == 2)
        gate.release.set()
        wait_for(lambda: storage.jobs_count(db) == {"succeeded": 11})

    assert gate.most["bulk"] == 2


def test_queues_without_slots_of_their_own_share_concurrency(db: Database) -> None:
    gate = Gate()
    lock = threading.Lock()
    shared = {"now": 0, "most": 0}

    @job(name="slots.shared", queue="a")
    def in_a(queue: str) -> None:
        with lock:
            shared["now"] += 1
            shared["most"] = max(shared["most"], shared["now"])
        try:
            assert gate.release.wait(30)
        finally:
            with lock:
                shared["now"] -= 1

    in_a.defer_many([{"queue": "a"}] * 3)
    in_a.options(queue="b").defer_many([{"queue": "b"}] * 3)
    in_a.options(queue="own").defer_many([{"queue": "own"}] * 2)
    settings = replace(FAST, queues=("a", "b"), concurrency=2, queue_slots={"own": 2})
    with BackgroundWorker(settings):
        wait_for(lambda: shared["now"] == 4)  # 2 shared by a and b, 2 of "own"
        gate.release.set()
        wait_for(lambda: storage.jobs_count(db) == {"succeeded": 8})

    assert shared["most"] == 4


def test_a_worker_with_slotted_queues_takes_only_those_and_its_plain_queues(
    db: Database,
) -> None:
    @job(name="slots.any", queue="x")
    def any_queue() -> None: ...

    taken = [any_queue.defer(), any_queue.options(queue="y").defer()]
    left = any_queue.options(queue="z").defer()
    worker = Worker(replace(FAST, queues=("x",), queue_slots={"y": 1}))
    worker.run_sync(drain=True)

    assert [storage.job_get(db, h.id).status for h in taken] == ["succeeded", "succeeded"]  # type: ignore[union-attr]
    assert storage.job_get(db, left.id).status == "queued"  # type: ignore[union-attr]
    assert worker.queue_filter == ("y", "x")
    assert worker.concurrency == 1 + WorkerSettings().concurrency


def test_the_command_line_gives_queues_slots_with_an_equals_sign() -> None:
    assert _queue_slots(["email=4", "default", "reports=1"]) == (
        ("email", "default", "reports"),
        {"email": 4, "reports": 1},
    )
    assert _queue_slots(None) == ((), {})


@pytest.mark.parametrize("bad", ["email=0", "=3", "email=many"])
def test_a_queue_with_no_slots_is_refused_with_the_form_to_use(bad: str) -> None:
    with pytest.raises(TaskletError, match="QUEUE=N"):
        _queue_slots([bad])


def test_settings_refuse_a_queue_with_no_slots() -> None:
    with pytest.raises(ValueError, match="at least 1 slot"):
        WorkerSettings(queue_slots={"email": 0})
