"""Control of jobs from outside their worker: cancel, and how a worker learns of it.

A queued job is cancelled in place. A running job cannot be stopped by a
statement: the request is stored (``cancel_requested_at``) and its worker is
told. On PostgreSQL a NOTIFY on the control channel, sent when the request
commits, tells every listening worker; the one holding the job acts on it.
Every worker also looks up the requests for its own running jobs now and then
(:func:`jobs_cancel_requested`), which is how SQLite workers in other processes
hear of them, and what covers a notification PostgreSQL never delivered.
"""

from __future__ import annotations

from typing import Final, Literal

import sqlalchemy as sa

from .._database import Database
from ..schema import jobs
from ._sql import now

#: What :func:`job_cancel` did.
CancelResult = Literal["cancelled", "requested", "finished", "missing"]

#: Control messages start with their kind; ``cancel:<job id>`` asks to cancel a running job.
CANCEL_PREFIX: Final = "cancel:"


def control_channel(db: Database) -> str:
    """The PostgreSQL channel for control messages (PostgreSQL keeps 63 bytes of a name)."""
    return f"{db.notify_channel}_control"[:63]


def cancel_payload(job_id: int) -> str:
    return f"{CANCEL_PREFIX}{job_id}"


def job_cancel(db: Database, job_id: int) -> CancelResult:
    """Cancel a job; returns what that did.

    * ``cancelled``: it was queued (or scheduled) and is now ``cancelled``;
    * ``requested``: it is running; the request is stored and its worker told;
    * ``finished``: it had already ended; nothing changed;
    * ``missing``: there is no job with this id.
    """
    options = db.execution_options
    with db.begin() as conn:
        current = now(conn)
        queued = jobs.c.status == "queued"
        cancel = (
            sa.update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status.in_(("queued", "running")))
            .values(
                status=sa.case((queued, "cancelled"), else_=jobs.c.status),
                finished_at=sa.case((queued, current), else_=jobs.c.finished_at),
                cancel_requested_at=sa.func.coalesce(jobs.c.cancel_requested_at, current),
            )
            .returning(jobs.c.status)
        )
        status = conn.execute(cancel, execution_options=options).scalar()
        if status is None:
            found = sa.select(jobs.c.id).where(jobs.c.id == job_id)
            exists = conn.execute(found, execution_options=options).first() is not None
            return "finished" if exists else "missing"
        if status == "cancelled":
            return "cancelled"
        if conn.dialect.name == "postgresql":
            # Delivered when this transaction commits, like an enqueue's wake-up.
            notify = sa.select(sa.func.pg_notify(control_channel(db), cancel_payload(job_id)))
            conn.execute(notify, execution_options=options)
        return "requested"


def jobs_cancel_requested(db: Database, worker_id: str) -> list[int]:
    """The running jobs of this worker whose cancel was requested (on the ``locked_by`` index)."""
    query = sa.select(jobs.c.id).where(
        jobs.c.locked_by == worker_id,
        jobs.c.status == "running",
        jobs.c.cancel_requested_at.is_not(None),
    )
    with db.begin(read_only=True) as conn:
        return list(conn.execute(query, execution_options=db.execution_options).scalars())
