"""The dashboard app over HTTP, on real databases: pages, actions, authentication, CSRF."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from tasklet import JobContext, JobHandle, job, storage
from tasklet._database import Database
from tasklet.cli import main
from tasklet.dashboard import DashboardError, create_app, is_loopback
from tasklet.worker import Worker, WorkerSettings
from tests.support import REPO, Backend, get_row, wait_for

AUTH = ("ops", "s3cret-pass")
SITE = "http://127.0.0.1"
FAST = WorkerSettings(concurrency=2, heartbeat_s=0.2, lost_after_s=1.0, sweep_s=0.2, grace_s=5)


def client(app: Starlette, auth: tuple[str, str] | None = AUTH) -> TestClient:
    web = TestClient(app, base_url=SITE, follow_redirects=False)
    if auth is not None:
        web.auth = auth
    return web


@pytest.fixture
def app(backend: Backend) -> Starlette:
    return create_app(username=AUTH[0], password=AUTH[1])


@pytest.fixture
def failed(db: Database) -> JobHandle:
    """A job that failed its only attempt, its arguments holding markup."""

    @job(name="dash.explode", queue="reports", max_attempts=1)
    def explode(ctx: JobContext, note: str) -> None:
        raise ValueError(f"cannot render {note}")

    handle = explode.defer(note="<script>alert('x')</script>")
    Worker(FAST).run_sync(drain=True)
    assert get_row(db, handle.id).status == "failed"
    return handle


def token(page: httpx.Response) -> str:
    match = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text)
    assert match, "the page has a form with a CSRF token"
    return match.group(1)


def post(web: TestClient, path: str, csrf: str, **fields: str) -> httpx.Response:
    return web.post(path, data={"csrf_token": csrf, **fields}, headers={"origin": SITE})


# ------------------------------------------------------------------ pages


@pytest.mark.parametrize(
    ("path", "shows"),
    [
        ("/", "reports"),
        ("/jobs", "dash.explode"),
        ("/jobs?status=failed&queue=reports", "dash.explode"),
        ("/workers", "No worker is running"),
    ],
)
def test_pages_render_for_a_signed_in_user(
    app: Starlette, failed: JobHandle, path: str, shows: str
) -> None:
    response = client(app).get(path)

    assert response.status_code == 200
    assert shows in response.text


def test_a_jobs_page_lists_the_failed_job_with_its_error(app: Starlette, failed: JobHandle) -> None:
    page = client(app).get("/jobs", params={"status": "failed"})

    assert f'href="/jobs/{failed.id}"' in page.text
    assert "ValueError: cannot render" in page.text


def test_a_jobs_page_refuses_an_unknown_status(app: Starlette) -> None:
    response = client(app).get("/jobs", params={"status": "done"})

    assert response.status_code == 400
    assert "status must be one of queued, scheduled" in response.text


def test_a_jobs_page_refuses_a_cursor_that_is_not_a_job_id(app: Starlette) -> None:
    for cursor in ("abc", "-1", str(2**63)):
        response = client(app).get("/jobs", params={"before": cursor})
        assert response.status_code == 400
        assert "before must be a job id" in response.text


def test_a_job_page_shows_its_arguments_and_every_run(app: Starlette, failed: JobHandle) -> None:
    page = client(app).get(f"/jobs/{failed.id}")

    assert page.status_code == 200
    assert "dash.explode" in page.text
    assert "Traceback (most recent call last)" in page.text
    assert page.text.count('<span class="badge badge-failed">failed</span>') == 2  # job and run


def test_job_arguments_and_errors_are_escaped(app: Starlette, failed: JobHandle) -> None:
    page = client(app).get(f"/jobs/{failed.id}").text

    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page


def test_pickled_arguments_are_never_unpickled_for_display(app: Starlette) -> None:
    @job(name="dash.pickled", serializer="pickle")
    def pickled(value: Any) -> None: ...

    handle = pickled.defer(value=complex(1, 2))

    page = client(app).get(f"/jobs/{handle.id}").text
    assert "pickled with cloudpickle" in page and "not shown" in page


def test_an_unknown_job_is_not_found(app: Starlette) -> None:
    response = client(app).get("/jobs/999")

    assert response.status_code == 404
    assert "job 999 does not exist" in response.text


def test_a_database_without_tables_says_to_migrate(empty_backend: Backend) -> None:
    response = client(create_app(username=AUTH[0], password=AUTH[1])).get("/")

    assert response.status_code == 503
    assert "tasklet migrate" in response.text


def test_every_response_carries_the_security_headers(app: Starlette) -> None:
    web = client(app, auth=None)
    for response in (web.get("/"), client(app).get("/"), client(app).get("/static/dashboard.css")):
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"


# ------------------------------------------------------------------ authentication


def test_every_route_needs_credentials_by_default(app: Starlette) -> None:
    web = client(app, auth=None)
    for path in ("/", "/jobs", "/jobs/1", "/workers", "/static/dashboard.js"):
        response = web.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith('Basic realm="tasklet dashboard"')


def test_a_wrong_password_or_user_is_refused(app: Starlette) -> None:
    for auth in (("ops", "wrong"), ("someone", AUTH[1]), ("ops", "")):
        assert client(app, auth=auth).get("/").status_code == 401


def test_a_malformed_authorization_header_is_refused(app: Starlette) -> None:
    for header in ("Basic !!!", "Bearer abc", "Basic " + "b3Bz"):  # "ops" without a colon
        assert client(app, auth=None).get("/", headers={"authorization": header}).status_code == 401


def test_public_reads_still_need_credentials_for_actions(
    backend: Backend, failed: JobHandle, db: Database
) -> None:
    app = create_app(username=AUTH[0], password=AUTH[1], public_reads=True)
    page = client(app, auth=None).get(f"/jobs/{failed.id}")
    assert page.status_code == 200

    response = post(client(app, auth=None), f"/jobs/{failed.id}/retry", token(page))

    assert response.status_code == 401
    assert get_row(db, failed.id).status == "failed"


def test_without_credentials_the_dashboard_is_read_only(
    backend: Backend, failed: JobHandle, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TASKLET_DASHBOARD_USER", raising=False)
    monkeypatch.delenv("TASKLET_DASHBOARD_PASSWORD", raising=False)
    app = create_app(public_reads=True)
    page = client(app, auth=None).get(f"/jobs/{failed.id}")
    assert "read-only" in page.text and "disabled" in page.text

    response = post(client(app, auth=None), f"/jobs/{failed.id}/retry", token(page))

    assert response.status_code == 403
    assert "TASKLET_DASHBOARD_USER" in response.text
    assert get_row(db, failed.id).status == "failed"


def test_the_app_refuses_to_start_without_credentials_unless_reads_are_public(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TASKLET_DASHBOARD_USER", raising=False)
    monkeypatch.delenv("TASKLET_DASHBOARD_PASSWORD", raising=False)
    with pytest.raises(DashboardError, match="set TASKLET_DASHBOARD_USER and TASKLET_DASHBOARD_"):
        create_app()
    with pytest.raises(DashboardError, match="set both"):
        create_app(username="ops")


def test_credentials_come_from_the_environment(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKLET_DASHBOARD_USER", "envuser")
    monkeypatch.setenv("TASKLET_DASHBOARD_PASSWORD", "envpass")
    app = create_app()

    assert client(app, auth=("envuser", "envpass")).get("/").status_code == 200
    assert client(app).get("/").status_code == 401


def test_sign_in_asks_for_credentials_then_returns_to_the_overview(backend: Backend) -> None:
    app = create_app(username=AUTH[0], password=AUTH[1], public_reads=True)

    assert client(app, auth=None).get("/login").status_code == 401
    response = client(app).get("/login")
    assert (response.status_code, response.headers["location"]) == (303, "/")


# ------------------------------------------------------------------ cross-site requests


def test_a_post_without_the_csrf_token_changes_nothing(
    app: Starlette, failed: JobHandle, db: Database
) -> None:
    for csrf in ("", "0" * 64):
        response = post(client(app), f"/jobs/{failed.id}/retry", csrf)
        assert response.status_code == 403
        assert "form token" in response.text
    assert get_row(db, failed.id).status == "failed"


def test_a_post_from_another_site_is_refused_even_with_the_token(
    app: Starlette, failed: JobHandle, db: Database
) -> None:
    web = client(app)
    csrf = token(web.get(f"/jobs/{failed.id}"))
    for headers in (
        {"origin": "http://evil.example"},
        {"origin": "null"},
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site", "origin": SITE},
    ):
        response = web.post(f"/jobs/{failed.id}/retry", data={"csrf_token": csrf}, headers=headers)
        assert response.status_code == 403, headers
    assert get_row(db, failed.id).status == "failed"


def test_behind_a_proxy_the_forwarded_host_is_the_dashboards_origin(
    app: Starlette, failed: JobHandle, db: Database
) -> None:
    web = client(app)
    csrf = token(web.get(f"/jobs/{failed.id}"))
    headers = {"origin": "https://jobs.example.com", "x-forwarded-host": "jobs.example.com"}

    response = web.post(f"/jobs/{failed.id}/retry", data={"csrf_token": csrf}, headers=headers)

    assert response.status_code == 303
    assert get_row(db, failed.id).status == "queued"


# ------------------------------------------------------------------ actions


def test_retry_puts_the_failed_job_back_in_its_queue(
    app: Starlette, failed: JobHandle, db: Database
) -> None:
    web = client(app)

    response = post(web, f"/jobs/{failed.id}/retry", token(web.get(f"/jobs/{failed.id}")))

    assert (response.status_code, response.headers["location"]) == (
        303,
        f"/jobs/{failed.id}?notice=retried",
    )
    row = get_row(db, failed.id)
    assert (row.status, row.max_attempts) == ("queued", 2)
    assert "queued again" in web.get(response.headers["location"]).text


def test_cancel_cancels_a_queued_job(app: Starlette, db: Database) -> None:
    @job(name="dash.later")
    def later() -> None: ...

    handle = later.defer_in(600)
    web = client(app)

    response = post(web, f"/jobs/{handle.id}/cancel", token(web.get(f"/jobs/{handle.id}")))

    assert response.headers["location"].endswith("notice=cancelled")
    assert get_row(db, handle.id).status == "cancelled"


def test_cancel_of_a_running_job_asks_its_worker_to_stop_it(app: Starlette, db: Database) -> None:
    @job(name="dash.busy")
    def busy() -> None: ...

    handle = busy.defer()
    storage.worker_register(db, worker_id="w", host="h", pid=1, queues=[], concurrency=1)
    storage.jobs_claim(db, worker_id="w", queues=None, names=["dash.busy"], limit=1)
    web = client(app)
    page = web.get(f"/jobs/{handle.id}")
    assert "Request cancel" in page.text

    response = post(web, f"/jobs/{handle.id}/cancel", token(page))

    assert response.headers["location"].endswith("notice=cancel_requested")
    assert get_row(db, handle.id).cancel_requested_at is not None


def test_pause_and_resume_a_queue(app: Starlette, failed: JobHandle) -> None:
    web = client(app)
    csrf = token(web.get("/"))

    paused = post(web, "/queues/pause", csrf, queue="reports")
    assert paused.headers["location"] == "/?notice=paused"
    assert '<span class="badge badge-paused"' in web.get("/").text
    post(web, "/queues/resume", csrf, queue="reports")
    assert '<span class="badge badge-paused"' not in web.get("/").text


# ------------------------------------------------------------------ mounting and serving


def test_mounted_in_another_app_its_links_and_redirects_stay_under_the_prefix(
    backend: Backend, failed: JobHandle, db: Database
) -> None:
    host = Starlette(routes=[Mount("/ops/jobs", create_app(username=AUTH[0], password=AUTH[1]))])
    web = client(host)

    page = web.get("/ops/jobs/jobs", params={"status": "failed"})
    assert f'href="/ops/jobs/jobs/{failed.id}"' in page.text
    assert 'href="/ops/jobs/static/dashboard.css"' in page.text
    assert web.get("/ops/jobs/static/dashboard.css").status_code == 200
    csrf = token(web.get(f"/ops/jobs/jobs/{failed.id}"))
    response = post(web, f"/ops/jobs/jobs/{failed.id}/retry", csrf)
    assert response.headers["location"] == f"/ops/jobs/jobs/{failed.id}?notice=retried"
    assert get_row(db, failed.id).status == "queued"


def test_only_loopback_addresses_count_as_private() -> None:
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "127.8.0.1")] == [
        True
    ] * 5
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.4", "example.com")] == [False] * 4


def test_the_command_refuses_to_listen_beyond_loopback_without_credentials(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TASKLET_DASHBOARD_USER", raising=False)
    monkeypatch.delenv("TASKLET_DASHBOARD_PASSWORD", raising=False)

    assert main(["dashboard", "--host", "0.0.0.0"]) == 1
    assert "needs credentials: set TASKLET_DASHBOARD_USER" in capsys.readouterr().err


@pytest.fixture
def served(backend: Backend) -> Iterator[str]:
    """`tasklet dashboard` in a process of its own, on a free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**backend.env, "TASKLET_DASHBOARD_USER": AUTH[0], "TASKLET_DASHBOARD_PASSWORD": AUTH[1]}
    command = [sys.executable, "-m", "tasklet", "dashboard", "--port", str(port)]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.slow
def test_the_command_serves_on_loopback_with_open_reads_and_guarded_actions(served: str) -> None:
    wait_for(lambda: _answers(served + "/"), timeout=30)

    assert httpx.post(served + "/queues/pause", data={"queue": "q"}).status_code == 401
    assert httpx.get(served + "/login", auth=AUTH).status_code in (200, 303)
