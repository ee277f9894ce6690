"""How the signup service tests its jobs, with tasklet's pytest plugin and tasklet.testing.

    cd examples && python -m pytest signup

No worker runs: ``assert_deferred`` reads the queued job, ``drain()`` runs it in
the test with the real worker, ``eager`` runs jobs as they are deferred.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from tasklet.pytest_plugin import TaskletDatabase
from tasklet.testing import Ran, assert_deferred, deferred_jobs, drain

from . import db
from .flask_app import create_app
from .jobs import send_welcome


@pytest.fixture
def client(tasklet_database: TaskletDatabase) -> Iterator[FlaskClient]:
    """The app on this test's fresh database (tasklet's tables and the app's, side by side)."""
    saved = db.engine
    db.use(tasklet_database.create_engine())
    try:
        yield create_app(worker=False).test_client()
    finally:
        db.engine.dispose()
        db.use(saved)


def test_signup_defers_a_welcome_that_marks_the_user_welcomed(client: FlaskClient) -> None:
    user_id = client.post("/signup", json={"email": "ada@example.com"}).get_json()["user"]

    (queued,) = assert_deferred(send_welcome, user_id=user_id)
    assert client.get(f"/users/{user_id}").get_json() == {
        "id": user_id,
        "email": "ada@example.com",
        "welcomed": False,
    }

    (ran,) = drain()

    assert (ran.id, ran.outcome, ran.result) == (queued.id, "succeeded", "ada@example.com")
    assert client.get(f"/users/{user_id}").get_json()["welcomed"] is True


def test_a_refused_signup_defers_nothing(client: FlaskClient) -> None:
    client.post("/signup", json={"email": "ada@example.com"})

    again = client.post("/signup", json={"email": "ada@example.com"})

    assert again.status_code == 409
    assert len(deferred_jobs(send_welcome)) == 1


def test_a_repeated_welcome_is_harmless(client: FlaskClient) -> None:
    user_id = client.post("/signup", json={"email": "ada@example.com"}).get_json()["user"]
    send_welcome.defer(user_id=user_id)  # a duplicate, as a retry after a crash would be

    ran: list[Ran] = drain()

    assert [(r.outcome, r.result) for r in ran] == [("succeeded", "ada@example.com")] * 2
    assert client.get(f"/users/{user_id}").get_json()["welcomed"] is True


def test_in_eager_mode_the_welcome_is_sent_when_the_signup_commits(
    client: FlaskClient, tasklet_eager: list[Ran]
) -> None:
    user_id = client.post("/signup", json={"email": "ada@example.com"}).get_json()["user"]

    assert client.get(f"/users/{user_id}").get_json()["welcomed"] is True
    assert [(r.name, r.args) for r in tasklet_eager] == [
        ("signup.jobs.send_welcome", {"user_id": user_id})
    ]
