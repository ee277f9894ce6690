"""The signup service as a Flask app, with tasklet's worker in a thread of its process.

    cd examples && python -m signup.flask_app --port 5000

``tasklet.start_in_thread()`` runs the worker beside the app and stops it
gracefully when the process exits (running jobs get their grace period, then
go back to the queue). Under gunicorn, call ``create_app()`` in each worker
process (the default without ``--preload``). To run jobs in separate worker
processes instead, pass ``worker=False`` and start
``tasklet worker -q email --import signup.jobs``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from flask import Flask, request
from sqlalchemy.exc import IntegrityError

import tasklet

from .db import Session, User, create_tables
from .jobs import send_welcome


def create_app(*, worker: bool = True) -> Flask:
    app = Flask(__name__)
    create_tables()
    if worker:
        tasklet.start_in_thread(tasklet.WorkerSettings(queues=("email",), grace_s=10))

    @app.post("/signup")
    def signup() -> tuple[dict[str, Any], int]:
        email = (request.get_json(silent=True) or {}).get("email")
        if not isinstance(email, str):
            return {"detail": 'send {"email": ...}'}, 422
        try:
            with Session.begin() as session:
                user = User(email=email)
                session.add(user)
                session.flush()  # the user's id, before the commit
                user_id = user.id
                handle = send_welcome.options(connection=session).defer(user_id=user_id)
        except IntegrityError:
            # Rolled back: no user, and no welcome mail either.
            return {"detail": f"{email} has already signed up"}, 409
        return {"user": user_id, "job": handle.id}, 201

    @app.get("/users/<int:user_id>")
    def get_user(user_id: int) -> tuple[dict[str, Any], int]:
        with Session() as session:
            user = session.get(User, user_id)
            if user is None:
                return {"detail": f"no user {user_id}"}, 404
            return {
                "id": user.id,
                "email": user.email,
                "welcomed": user.welcomed_at is not None,
            }, 200

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5000)
    port = parser.parse_args().port
    # SIGTERM (from a supervisor) exits like Ctrl-C does, so the worker stops gracefully.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    create_app().run(host="127.0.0.1", port=port)


if __name__ == "__main__":
    main()
