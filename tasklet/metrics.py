"""Prometheus metrics for a worker: ``tasklet worker --metrics-port 9464``.

Counters and histograms are updated as attempts start and end (a few dict
look-ups per job); queue depths are read from the database when Prometheus
scrapes, at most every ``depth_every_s`` seconds. The endpoint is read-only and
binds 127.0.0.1 unless told otherwise.

Needs the ``metrics`` extra: ``pip install 'tasklet[metrics]'``.

>>> from tasklet import Worker, WorkerSettings
>>> from tasklet.metrics import WorkerMetrics
>>> worker = Worker(WorkerSettings())  # doctest: +SKIP
>>> WorkerMetrics(worker).serve(port=9464)  # doctest: +SKIP
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import storage
from .errors import TaskletError

if TYPE_CHECKING:
    from ._executor import Outcome
    from .worker import Worker

try:
    import prometheus_client
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as error:  # pragma: no cover - depends on the install
    raise TaskletError("metrics need prometheus_client: pip install 'tasklet[metrics]'") from error

__all__ = ["WorkerMetrics"]

# Seconds: jobs range from a few milliseconds to many minutes.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
_LABELS = ("queue", "job")


class _QueueDepth(Collector):
    """``tasklet_queue_jobs{queue, state}``, read from the database at scrape time."""

    def __init__(self, worker: Worker, every_s: float) -> None:
        self._worker = worker
        self._every_s = every_s
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._depths: dict[str, dict[str, int]] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tasklet_queue_jobs",
            "Jobs per queue: due now, scheduled for later, running (all workers)",
            labels=["queue", "state"],
        )
        for queue, states in sorted(self._read().items()):
            for state, count in states.items():
                family.add_metric([queue, state], count)
        yield family

    def _read(self) -> dict[str, dict[str, int]]:
        with self._lock:
            if time.monotonic() - self._read_at >= self._every_s:
                try:
                    self._depths = storage.queue_depths(self._worker.db)
                except Exception:  # a scrape must not fail because the database blinked
                    return self._depths
                self._read_at = time.monotonic()
            return self._depths


class WorkerMetrics:
    """A worker's Prometheus metrics, on a registry of their own."""

    def __init__(self, worker: Worker, *, depth_every_s: float = 5.0) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        metric: dict[str, Any] = {"labelnames": _LABELS, "registry": self.registry}
        self._started = prometheus_client.Counter(
            "tasklet_jobs_started", "Attempts started by this worker", **metric
        )
        self._succeeded = prometheus_client.Counter(
            "tasklet_jobs_succeeded", "Attempts that succeeded", **metric
        )
        self._failed = prometheus_client.Counter(
            "tasklet_jobs_failed",
            "Jobs that failed for good (no attempt left, or not retried)",
            **metric,
        )
        self._retried = prometheus_client.Counter(
            "tasklet_jobs_retried", "Attempts that failed and will be retried", **metric
        )
        self._ended = prometheus_client.Counter(
            "tasklet_attempts",
            "Attempts by how they ended (succeeded, failed, timed_out, interrupted ...)",
            labelnames=(*_LABELS, "outcome"),
            registry=self.registry,
        )
        self._duration = prometheus_client.Histogram(
            "tasklet_job_duration_seconds",
            "How long attempts ran",
            buckets=_DURATION_BUCKETS,
            **metric,
        )
        self._wait = prometheus_client.Histogram(
            "tasklet_job_queue_wait_seconds",
            "From when a job was due to when its attempt started",
            buckets=_DURATION_BUCKETS,
            **metric,
        )
        self.registry.register(_QueueDepth(worker, depth_every_s))
        worker.observers.append(self)
        self._server: Any = None

    def attempt_started(self, queue: str, name: str) -> None:
        self._started.labels(queue, name).inc()

    def attempt_ended(self, queue: str, name: str, wait_s: float, outcome: Outcome) -> None:
        self._ended.labels(queue, name, outcome.kind).inc()
        self._duration.labels(queue, name).observe(
            (outcome.finished_at - outcome.started_at).total_seconds()
        )
        self._wait.labels(queue, name).observe(max(0.0, wait_s))
        if outcome.kind == "succeeded":
            self._succeeded.labels(queue, name).inc()
        elif outcome.step is not None and outcome.kind != "interrupted":
            (self._retried if outcome.step.will_retry else self._failed).labels(queue, name).inc()

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns the bound port."""
        server, _thread = prometheus_client.start_http_server(
            port, addr=host, registry=self.registry
        )
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
