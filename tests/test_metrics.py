"""Prometheus metrics of a worker: counters per outcome, histograms, queue depths."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import tasklet
from tasklet import job
from tasklet.metrics import WorkerMetrics
from tasklet.worker import Worker
from tests import support, worker_jobs
from tests.support import FAST, Backend, Log, tasklet_process, wait_for


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at http://127.0.0.1:port/metrics, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(**values: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(values.items()))


@pytest.fixture
def metered() -> Iterator[tuple[Worker, WorkerMetrics]]:
    worker = Worker(FAST)
    metrics = WorkerMetrics(worker, depth_every_s=0)
    yield worker, metrics
    metrics.close()


def test_counters_follow_attempts_by_outcome(
    backend: Backend, metered: tuple[Worker, WorkerMetrics]
) -> None:
    worker, metrics = metered

    @job(name="m.ok", queue="mq")
    def ok() -> None: ...

    @job(name="m.bad", queue="mq", max_attempts=2, backoff=0)
    def bad() -> None:
        raise ValueError("no")

    ok.defer()
    bad.defer()
    port = metrics.serve(0)
    worker.run_sync(drain=True)
    samples = scrape(port)

    ok_labels, bad_labels = labels(queue="mq", job="m.ok"), labels(queue="mq", job="m.bad")
    assert samples[("tasklet_jobs_started_total", ok_labels)] == 1
    assert samples[("tasklet_jobs_started_total", bad_labels)] == 2
    assert samples[("tasklet_jobs_succeeded_total", ok_labels)] == 1
    assert samples[("tasklet_jobs_retried_total", bad_labels)] == 1
    assert samples[("tasklet_jobs_failed_total", bad_labels)] == 1
    assert (
        samples[("tasklet_attempts_total", labels(queue="mq", job="m.bad", outcome="failed"))] == 2
    )
    assert samples[("tasklet_job_duration_seconds_count", bad_labels)] == 2
    assert samples[("tasklet_job_queue_wait_seconds_count", ok_labels)] == 1


def test_queue_depths_count_due_scheduled_and_running_jobs(
    backend: Backend, metered: tuple[Worker, WorkerMetrics]
) -> None:
    _worker, metrics = metered

    @job(name="m.later", queue="depth")
    def later() -> None: ...

    later.defer()
    later.defer()
    later.defer_in(3600)
    samples = scrape(metrics.serve(0))

    assert samples[("tasklet_queue_jobs", labels(queue="depth", state="due"))] == 2
    assert samples[("tasklet_queue_jobs", labels(queue="depth", state="scheduled"))] == 1
    assert samples[("tasklet_queue_jobs", labels(queue="depth", state="running"))] == 0


def test_the_endpoint_binds_loopback_by_default(metered: tuple[Worker, WorkerMetrics]) -> None:
    _worker, metrics = metered
    metrics.serve(0)

    assert metrics._server is not None
    assert metrics._server.server_address[0] == "127.0.0.1"


def test_a_failing_observer_does_not_fail_the_attempt(backend: Backend) -> None:
    class Broken:
        def attempt_started(self, queue: str, name: str) -> None:
            raise RuntimeError("observer bug")

        def attempt_ended(self, *args: object) -> None:
            raise RuntimeError("observer bug")

    @job(name="m.fine")
    def fine() -> int:
        return 1

    handle = fine.defer()
    worker = Worker(FAST)
    worker.observers.append(Broken())
    worker.run_sync(drain=True)

    assert [r.outcome for r in tasklet.get_runs(handle.id)] == ["succeeded"]


@pytest.mark.slow
def test_worker_command_serves_metrics_on_the_port_it_is_given(
    backend: Backend, log: Log, processes: list[subprocess.Popen[bytes]]
) -> None:
    worker_jobs.count.defer(n=1)
    worker = tasklet_process(backend, log, "worker", "-q", "work", "--metrics-port", "0")
    processes.append(worker)
    output = Path(support._outputs[worker.pid].name)
    found: list[int] = []

    def port_logged() -> bool:
        match = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", output.read_text())
        if match:
            found.append(int(match.group(1)))
        return bool(match)

    wait_for(port_logged)
    wait_for(
        lambda: (
            scrape(found[0]).get(
                ("tasklet_jobs_succeeded_total", labels(queue="work", job="tests.worker.count"))
            )
            == 1
        )
    )
