"""The signup's background jobs. Workers import this module (``--import signup.jobs``)."""

from __future__ import annotations

import datetime as dt

from tasklet import job

from .db import Session, User


@job(queue="email", max_attempts=5)
def send_welcome(user_id: int) -> str:
    """Send the welcome mail (here: record that it was sent) for a user who signed up."""
    with Session.begin() as session:
        user = session.get(User, user_id)
        if user is None:  # cannot happen: the job was deferred in the user's transaction
            raise LookupError(f"no user {user_id}")
        if user.welcomed_at is None:  # a retried or repeated attempt sends nothing twice
            # A real app calls its mail provider here, e.g. mailer.send(user.email, ...).
            user.welcomed_at = dt.datetime.now(dt.UTC)
        return user.email
