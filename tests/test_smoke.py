from tasklet import job, storage
from tasklet._database import Database


def test_defer_stores_a_queued_row(db: Database) -> None:
    @job(queue="email", max_attempts=5, name="smoke.send_welcome")
    def send_welcome(user_id: int) -> None: ...

    handle = send_welcome.defer(user_id=5)

    row = storage.job_get(db, handle.id)
    assert row is not None
    assert (row.name, row.queue, row.status, row.args) == (
        "smoke.send_welcome",
        "email",
        "queued",
        {"user_id": 5},
    )
