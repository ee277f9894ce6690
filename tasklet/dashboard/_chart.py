"""The throughput chart's geometry: one line per queue, drawn as inline SVG by the template."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..storage.dashboard import Throughput

PALETTE = ("#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#db2777", "#4b5563")
WIDTH, HEIGHT = 760, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 12, 12, 26


@dataclass(frozen=True, slots=True)
class Line:
    queue: str
    color: str
    points: str
    total: int


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    lines: list[Line]
    y_ticks: list[tuple[float, str]]
    x_ticks: list[tuple[float, str]]
    bucket_label: str


def _nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5 x 10^n at or above ``value`` (an axis that reads well)."""
    if value <= 4:
        return 4
    magnitude = int(10 ** math.floor(math.log10(value)))
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude  # pragma: no cover (the loop always returns)


def build_chart(throughput: Throughput) -> Chart:
    buckets = max((len(v) for v in throughput.series.values()), default=0) or 60
    peak = _nice_ceiling(max((max(v) for v in throughput.series.values()), default=0))
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    bottom = _TOP + plot_h

    def x(i: int) -> float:
        return round(_LEFT + plot_w * i / max(1, buckets - 1), 1)

    def y(n: int) -> float:
        return round(bottom - plot_h * n / peak, 1)

    lines = [
        Line(
            queue=queue,
            color=PALETTE[index % len(PALETTE)],
            points=" ".join(f"{x(i)},{y(n)}" for i, n in enumerate(counts)),
            total=sum(counts),
        )
        for index, (queue, counts) in enumerate(throughput.series.items())
    ]
    y_ticks = [(y(peak * k // 4), f"{peak * k // 4:,}") for k in range(5)]
    step = max(1, buckets // 4)
    x_ticks = []
    for i in range(0, buckets, step):
        moment = throughput.start + throughput.bucket * i
        x_ticks.append((x(i), moment.strftime("%H:%M")))
    seconds = int(throughput.bucket.total_seconds())
    label = "per minute" if seconds == 60 else f"per {seconds} s"
    return Chart(WIDTH, HEIGHT, _LEFT, WIDTH - _RIGHT, _TOP, bottom, lines, y_ticks, x_ticks, label)
