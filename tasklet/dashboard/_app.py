"""The dashboard's routes: server-rendered pages over the storage operations, and actions."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import _config, storage
from ..errors import TaskletError
from ..storage import dashboard as store
from . import _control
from ._chart import build_chart
from ._security import (
    PASSWORD_ENV,
    SECRET_ENV,
    USER_ENV,
    Credentials,
    Guard,
    csrf_token,
    new_secret,
    read_form,
)

_HERE = Path(__file__).parent
PAGE_SIZE: Final = 50
SUCCEEDED_WINDOW: Final = dt.timedelta(hours=24)
NOTICES: Final = {
    "retried": "The job is queued again and due now.",
    "not_retryable": "Only failed or cancelled jobs can be retried.",
    "cancelled": "The job was cancelled.",
    "cancel_requested": "Cancellation requested: the worker running the job will stop it.",
    "not_cancellable": "Only queued or running jobs can be cancelled.",
    "paused": "The queue is paused: workers start none of its jobs until it is resumed.",
    "resumed": "The queue is resumed.",
}


class DashboardError(TaskletError):
    """The dashboard cannot start as configured (the message says what to set)."""


def _ago(value: dt.datetime | None, now: dt.datetime) -> str:
    if value is None:
        return ""
    seconds = (now - value).total_seconds()
    future, seconds = seconds < 0, abs(seconds)
    if seconds < 60:
        text = f"{seconds:.0f} s"
    elif seconds < 3600:
        text = f"{seconds // 60:.0f} min"
    elif seconds < 86400:
        text = f"{seconds // 3600:.0f} h"
    else:
        text = f"{seconds // 86400:.0f} d"
    return f"in {text}" if future else f"{text} ago"


def _when(value: dt.datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(start: dt.datetime | None, end: dt.datetime | None) -> str:
    if start is None or end is None:
        return ""
    seconds = (end - start).total_seconds()
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,  # every value (arguments, errors, names) is escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    return env


def _optional(request: Request, key: str) -> str | None:
    value = request.query_params.get(key, "").strip()
    return value or None


def _optional_id(request: Request, key: str) -> int | None:
    value = _optional(request, key)
    if value is None:
        return None
    if not value.isdigit() or int(value) >= 2**63:
        raise HTTPException(400, f"{key} must be a job id")
    return int(value)


class _Dashboard:
    def __init__(self, credentials: Credentials | None, secret: bytes, title: str) -> None:
        self.credentials = credentials
        self.secret = secret
        self.title = title
        self.env = _environment()

    def render(
        self, request: Request, template: str, status_code: int = 200, **values: Any
    ) -> Response:
        base = _base(request)
        now = dt.datetime.now(dt.UTC)

        def url(path: str, **query: Any) -> str:
            params = {k: v for k, v in query.items() if v is not None}
            return base + path + (f"?{urlencode(params)}" if params else "")

        notice = NOTICES.get(request.query_params.get("notice", ""))
        html = self.env.get_template(template).render(
            title=self.title,
            url=url,
            ago=lambda value: _ago(value, now),
            duration=_duration,
            user=getattr(request.state, "user", None),
            can_act=self.credentials is not None,
            csrf=csrf_token(self.secret),
            database=_where(),
            notice=notice,
            **{"refresh": None, "page": None, **values},
        )
        return HTMLResponse(html, status_code=status_code)

    async def overview(self, request: Request) -> Response:
        db = _config.database()
        queues = await run_in_threadpool(store.dashboard_queues, db, window=SUCCEEDED_WINDOW)
        throughput = await run_in_threadpool(
            lambda: store.dashboard_throughput(db, buckets=60, bucket=dt.timedelta(minutes=1))
        )
        workers = await run_in_threadpool(store.dashboard_workers, db)
        totals = {
            key: sum(getattr(q, key) for q in queues)
            for key in ("queued", "scheduled", "running", "failed", "succeeded")
        }
        chart = build_chart(throughput)
        return self.render(
            request,
            "overview.html",
            page="overview",
            queues=queues,
            totals=totals,
            chart=chart,
            workers=len(workers),
            refresh=5,
        )

    async def jobs(self, request: Request) -> Response:
        status = _optional(request, "status")
        if status is not None and status not in store.LIST_STATUSES:
            raise HTTPException(400, f"status must be one of {', '.join(store.LIST_STATUSES)}")
        filters = {
            "queue": _optional(request, "queue"),
            "status": status,
            "name": _optional(request, "name"),
        }
        before, after = _optional_id(request, "before"), _optional_id(request, "after")
        db = _config.database()
        page = await run_in_threadpool(
            lambda: store.dashboard_jobs_page(
                db, **filters, before=before, after=after, limit=PAGE_SIZE
            )
        )
        queues = await run_in_threadpool(store.dashboard_queues, db, window=SUCCEEDED_WINDOW)
        return self.render(
            request,
            "jobs.html",
            page="jobs",
            result=page,
            filters=filters,
            queue_names=[q.queue for q in queues],
            statuses=store.LIST_STATUSES,
        )

    async def job(self, request: Request) -> Response:
        job_id: int = request.path_params["job_id"]
        db = _config.database()
        row = await run_in_threadpool(storage.job_get, db, job_id)
        if row is None:
            raise HTTPException(404, f"job {job_id} does not exist (it may have been deleted)")
        runs = await run_in_threadpool(storage.job_runs_list, db, job_id)
        if row.args is not None:
            arguments = json.dumps(row.args, indent=2, ensure_ascii=False, sort_keys=True)
        else:
            size = len(row.args_pickle or b"")
            arguments = f"(pickled with cloudpickle, {size:,} bytes: not shown)"
        live = row.status in ("queued", "running")
        return self.render(
            request,
            "job.html",
            page="jobs",
            job=row,
            runs=list(reversed(runs)),
            arguments=arguments,
            refresh=2 if live else None,
        )

    async def workers(self, request: Request) -> Response:
        found = await run_in_threadpool(store.dashboard_workers, _config.database())
        return self.render(request, "workers.html", page="workers", workers=found, refresh=5)

    async def login(self, request: Request) -> Response:
        # The guard has already asked for and checked the credentials.
        return RedirectResponse(_base(request) + "/", 303)

    async def _act(
        self, request: Request, action: Callable[[dict[str, str]], str], back: str
    ) -> Response:
        """Check the form, run the action, and show ``back`` with the notice it names."""
        form = await read_form(request, self.secret)
        try:
            notice = await run_in_threadpool(action, form)
        except TaskletError as error:
            return self.render(request, "error.html", status_code=409, message=str(error))
        return RedirectResponse(f"{_base(request)}{back}?notice={notice}", status_code=303)

    async def retry(self, request: Request) -> Response:
        job_id: int = request.path_params["job_id"]

        def retry(_: dict[str, str]) -> str:
            return "retried" if _control.retry_job(job_id) else "not_retryable"

        return await self._act(request, retry, f"/jobs/{job_id}")

    async def cancel(self, request: Request) -> Response:
        job_id: int = request.path_params["job_id"]
        return await self._act(request, lambda _: _control.cancel_job(job_id), f"/jobs/{job_id}")

    async def pause(self, request: Request) -> Response:
        def pause(form: dict[str, str]) -> str:
            _control.pause_queue(_queue(form))
            return "paused"

        return await self._act(request, pause, "/")

    async def resume(self, request: Request) -> Response:
        def resume(form: dict[str, str]) -> str:
            _control.resume_queue(_queue(form))
            return "resumed"

        return await self._act(request, resume, "/")

    async def http_error(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        return self.render(
            request, "error.html", status_code=error.status_code, message=error.detail
        )

    async def tasklet_error(self, request: Request, error: Exception) -> Response:
        return self.render(request, "error.html", status_code=503, message=str(error))


def _queue(form: dict[str, str]) -> str:
    queue = form.get("queue", "")
    if not queue:
        raise HTTPException(400, "name the queue to pause or resume")
    return queue


def _base(request: Request) -> str:
    """Where the dashboard is mounted: links and redirects start here."""
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")


def _where() -> str:
    db = _config.database()
    return db.display_url if db.schema is None else f"{db.display_url} (schema {db.schema})"


def create_app(
    *,
    username: str | None = None,
    password: str | None = None,
    public_reads: bool = False,
    secret: str | None = None,
    title: str = "tasklet",
) -> Starlette:
    """The dashboard as an ASGI app, on the database tasklet is configured with.

    ``username``/``password`` default to ``$TASKLET_DASHBOARD_USER`` and
    ``$TASKLET_DASHBOARD_PASSWORD``. Every page needs them unless
    ``public_reads`` is true (``tasklet dashboard`` sets it when bound to
    loopback); actions always do. ``secret`` (``$TASKLET_DASHBOARD_SECRET``)
    signs the forms: give every process behind one address the same one.

    >>> app.mount("/jobs", create_app())  # doctest: +SKIP
    """
    username = username if username is not None else os.environ.get(USER_ENV) or None
    password = password if password is not None else os.environ.get(PASSWORD_ENV) or None
    if (username is None) != (password is None):
        raise DashboardError(f"set both {USER_ENV} and {PASSWORD_ENV} (or neither)")
    credentials = None if username is None or password is None else Credentials(username, password)
    if credentials is None and not public_reads:
        raise DashboardError(
            f"the dashboard needs credentials: set {USER_ENV} and {PASSWORD_ENV} "
            "(or pass username= and password=); it runs without them only on loopback, read-only"
        )
    dashboard = _Dashboard(credentials, new_secret(secret or os.environ.get(SECRET_ENV)), title)
    routes = [
        Route("/", dashboard.overview, name="overview"),
        Route("/jobs", dashboard.jobs, name="jobs"),
        Route("/jobs/{job_id:int}", dashboard.job, name="job"),
        Route("/jobs/{job_id:int}/retry", dashboard.retry, methods=["POST"]),
        Route("/jobs/{job_id:int}/cancel", dashboard.cancel, methods=["POST"]),
        Route("/queues/pause", dashboard.pause, methods=["POST"]),
        Route("/queues/resume", dashboard.resume, methods=["POST"]),
        Route("/workers", dashboard.workers, name="workers"),
        Route("/login", dashboard.login),
        Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(Guard, credentials=credentials, public_reads=public_reads)],
        exception_handlers={
            HTTPException: dashboard.http_error,
            TaskletError: dashboard.tasklet_error,
        },
    )
