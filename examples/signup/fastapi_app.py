"""The signup service as a FastAPI app, with tasklet's worker inside it.

    cd examples && uvicorn signup.fastapi_app:app

The worker runs on the app's event loop for the app's lifetime (``lifespan``)
and stops with it: on shutdown (Ctrl-C, SIGTERM to uvicorn) running jobs get
their grace period, then go back to the queue. To run jobs in separate worker
processes instead, drop the ``run_worker`` line and start
``tasklet worker -q email --import signup.jobs``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError

import tasklet

from .db import Session, User, create_tables
from .jobs import send_welcome


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    create_tables()
    async with tasklet.run_worker(tasklet.WorkerSettings(queues=("email",), grace_s=10)):
        yield


app = FastAPI(lifespan=lifespan)


class Signup(BaseModel):
    email: str


@app.post("/signup", status_code=201)
def signup(body: Signup) -> dict[str, int]:
    # A sync endpoint: FastAPI runs it in a thread, so the blocking session is fine.
    try:
        with Session.begin() as session:
            user = User(email=body.email)
            session.add(user)
            session.flush()  # the user's id, before the commit
            user_id = user.id
            handle = send_welcome.options(connection=session).defer(user_id=user_id)
    except IntegrityError:
        # Rolled back: no user, and no welcome mail either.
        raise HTTPException(409, f"{body.email} has already signed up") from None
    return {"user": user_id, "job": handle.id}


@app.get("/users/{user_id}")
def get_user(user_id: int) -> dict[str, object]:
    with Session() as session:
        user = session.get(User, user_id)
        if user is None:
            raise HTTPException(404, f"no user {user_id}")
        return {"id": user.id, "email": user.email, "welcomed": user.welcomed_at is not None}
