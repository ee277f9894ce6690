"""The dashboard in a real headless Chromium, served by uvicorn, with a worker running.

An operator opens the overview, pauses and resumes a queue, filters the jobs
down to a failed one, opens it, presses retry and watches it succeed; markup in
a job's arguments and error shows as text and never runs. Screenshots go to
tmp_path, or to docs/images/ for the README with TASKLET_UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import uvicorn
from playwright.sync_api import Browser, Dialog, Page, expect, sync_playwright
from starlette.types import ASGIApp

from tasklet import JobContext, job
from tasklet._database import Database
from tasklet.dashboard import create_app
from tasklet.schema import jobs
from tasklet.storage import utcnow
from tasklet.worker import WorkerSettings
from tests.support import REPO, Backend, BackgroundWorker, get_row, wait_for

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# No network, no sandbox (root in a container), nothing phoning home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
USER, PASSWORD = "ops", "correct horse battery"
MARKUP = "<script>alert('xss')</script><img src=x onerror=alert(1)>"
FAST = WorkerSettings(concurrency=4, heartbeat_s=0.2, lost_after_s=2.0, sweep_s=0.2, grace_s=5)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing (CI=true: .ci/run installs Debian's chromium)")
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@contextlib.contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    """uvicorn in a thread on a free loopback port, as `tasklet dashboard` runs it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="off", ws="none", http="h11")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=15)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def _seed_history(db: Database) -> None:
    """An hour of finished jobs in three queues, so the throughput chart has a shape."""
    now = utcnow()
    rows: list[dict[str, Any]] = []
    shapes = {"email": (26, 12), "reports": (8, 5), "default": (15, 7)}
    for minute in range(1, 60):
        at = now - dt.timedelta(minutes=minute, seconds=5)
        if db.dialect == "sqlite":
            at = at.replace(tzinfo=None)
        for index, (queue, (base, swing)) in enumerate(shapes.items()):
            count = int(base + swing * math.sin(minute / 7 + index * 2))
            rows += [
                {
                    "name": f"shop.{queue}_task",
                    "queue": queue,
                    "priority": 0,
                    "status": "succeeded",
                    "serializer": "json",
                    "args": {},
                    "attempts": 1,
                    "max_attempts": 3,
                    "lost_count": 0,
                    "run_at": at,
                    "created_at": at,
                    "started_at": at,
                    "finished_at": at,
                    "lease": 1,
                }
            ] * count
    with db.begin() as conn:
        conn.execute(sa.insert(jobs), rows, execution_options=db.execution_options)


def _screenshot(page: Page, tmp_path: Path, name: str) -> None:
    folder = REPO / "docs" / "images" if os.environ.get("TASKLET_UPDATE_SCREENSHOTS") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=True)


def test_an_operator_filters_to_a_failed_job_retries_it_and_sees_it_succeed(
    backend: Backend, db: Database, browser: Browser, tmp_path: Path
) -> None:
    @job(name="shop.sync_inventory", queue="reports", max_attempts=1)
    def sync_inventory(ctx: JobContext, warehouse: str) -> str:
        if ctx.attempt == 1:
            raise ConnectionError(f"warehouse {warehouse} did not answer within 30 s")
        return "synced"

    @job(name="shop.render_note", queue="email", max_attempts=1)
    def render_note(order_id: int, note: str) -> None:
        raise ValueError(f"cannot render note {note}")

    @job(name="shop.send_receipt", queue="email")
    def send_receipt(order_id: int) -> None: ...

    _seed_history(db)
    flaky = sync_inventory.defer(warehouse="berlin-2")
    hostile = render_note.defer(order_id=1042, note=MARKUP)
    send_receipt.defer_many([{"order_id": n} for n in range(3)])
    for minutes in (5, 30, 90):
        send_receipt.defer_in(dt.timedelta(minutes=minutes), order_id=minutes)
    app = create_app(username=USER, password=PASSWORD, public_reads=True)

    with BackgroundWorker(FAST), serving(app) as base:
        wait_for(lambda: get_row(db, flaky.id).status == "failed")
        wait_for(lambda: get_row(db, hostile.id).status == "failed")
        context = browser.new_context(
            base_url=base,
            http_credentials={"username": USER, "password": PASSWORD},
            viewport={"width": 1280, "height": 900},
        )
        page = context.new_page()
        dialogs: list[str] = []

        def on_dialog(dialog: Dialog) -> None:
            dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.goto("/login")  # the browser signs in and lands on the overview

        queues = page.locator("#queues")
        expect(queues).to_contain_text("reports")
        expect(queues.locator("tr", has_text="email").locator("td").nth(2)).to_have_text("3")
        expect(page.locator(".legend")).to_contain_text("email")
        expect(page.locator(".user")).to_have_text(USER)
        _screenshot(page, tmp_path, "dashboard.png")

        email = page.locator("#queues tr", has_text="email")
        email.get_by_role("button", name="Pause").click()
        expect(page.locator(".notice")).to_contain_text("The queue is paused")
        expect(email.locator(".badge")).to_have_text("paused")
        email.get_by_role("button", name="Resume").click()
        expect(email.locator(".badge")).to_have_text("active")

        page.get_by_role("link", name="Jobs", exact=True).click()
        page.select_option("select[name=queue]", "reports")
        page.select_option("select[name=status]", "failed")
        page.get_by_role("button", name="Filter").click()
        expect(page).to_have_url(re.compile(r"status=failed"))
        rows = page.locator("#jobs tbody tr")
        expect(rows).to_have_count(1)
        rows.get_by_role("link", name="shop.sync_inventory").click()

        expect(page.locator("#last-error")).to_contain_text("berlin-2 did not answer")
        expect(page.locator("#runs tbody tr")).to_have_count(1)
        page.locator("#runs summary").click()
        expect(page.locator("#runs details pre")).to_contain_text("ConnectionError")
        _screenshot(page, tmp_path, "job.png")

        page.get_by_role("button", name="Retry now").click()
        expect(page.locator(".notice")).to_contain_text("queued again")
        # The page follows the job while it is queued or running.
        expect(page.locator("#job-status")).to_have_text("succeeded", timeout=30_000)
        expect(page.locator("#runs tbody tr")).to_have_count(2)
        assert get_row(db, flaky.id).status == "succeeded"

        page.goto(f"/jobs/{hostile.id}")
        expect(page.locator("#arguments")).to_contain_text(MARKUP)
        expect(page.locator("#last-error")).to_contain_text(MARKUP)
        page.goto("/jobs?status=failed")
        expect(page.locator("#jobs")).to_contain_text("<script>alert('xss')</script>")
        assert page.locator("img[src=x]").count() == 0
        assert page.locator("script").count() == 1  # the dashboard's own, from /static
        assert dialogs == []
        context.close()
