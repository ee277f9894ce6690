"""The throughput chart's geometry: one line per queue, drawn as inline SVG by the template."""

from __future__ import annotations

from dataclasses import dataclass

from ..storage.dashboard import Throughput

PALETTE = ("#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#db2777", "#4b5563")
# About the size it is shown at, so its text keeps the page's size.
WIDTH, HEIGHT = 1100, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 12, 12, 26


@dataclass(frozen=True, slots=True)
class Line:
    queue: str
    color: str
    points: str
    #: The bucket still filling (now), drawn dashed so it does not read as a drop.
    partial: str
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


def _nice_step(value: float) -> int:
    """The smallest of 1, 2, 5 x 10^n at or above ``value``: axis steps that read well."""
    magnitude = 1
    while True:
        for step in (1, 2, 5):
            if step * magnitude >= value:
                return step * magnitude
        magnitude *= 10


def build_chart(throughput: Throughput) -> Chart:
    buckets = max((len(v) for v in throughput.series.values()), default=0) or 60
    step = _nice_step(max((max(v) for v in throughput.series.values()), default=0) / 4)
    peak = 4 * step
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
            points=" ".join(f"{x(i)},{y(n)}" for i, n in enumerate(counts[:-1])),
            partial=" ".join(f"{x(i)},{y(counts[i])}" for i in (buckets - 2, buckets - 1)),
            total=sum(counts),
        )
        for index, (queue, counts) in enumerate(throughput.series.items())
    ]
    y_ticks = [(y(step * k), f"{step * k:,}") for k in range(5)]
    x_ticks = []
    for i in range(0, buckets, max(1, buckets // 6)):
        moment = throughput.start + throughput.bucket * i
        x_ticks.append((x(i), moment.strftime("%H:%M")))
    seconds = int(throughput.bucket.total_seconds())
    label = "per minute" if seconds == 60 else f"per {seconds} s"
    return Chart(WIDTH, HEIGHT, _LEFT, WIDTH - _RIGHT, _TOP, bottom, lines, y_ticks, x_ticks, label)
