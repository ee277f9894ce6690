"""The throughput chart's geometry: axes that read well, one line per queue."""

from __future__ import annotations

import datetime as dt

from tasklet.dashboard._chart import HEIGHT, build_chart
from tasklet.storage.dashboard import Throughput

START = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def test_the_y_axis_has_five_round_ticks_above_the_busiest_minute() -> None:
    chart = build_chart(Throughput(START, dt.timedelta(minutes=1), {"mail": [0, 37, 5]}))

    assert [label for _, label in chart.y_ticks] == ["0", "10", "20", "30", "40"]


def test_each_queue_gets_a_line_and_a_dashed_segment_for_the_minute_still_filling() -> None:
    series = {"mail": [1, 2, 3, 4], "reports": [0, 0, 8, 0]}
    chart = build_chart(Throughput(START, dt.timedelta(minutes=1), series))

    assert [(line.queue, line.total) for line in chart.lines] == [("mail", 10), ("reports", 8)]
    mail = chart.lines[0]
    assert len(mail.points.split()) == 3 and len(mail.partial.split()) == 2
    assert mail.points.split()[-1] == mail.partial.split()[0]
    assert chart.x_ticks[0] == (chart.left, "12:00")


def test_an_idle_hour_draws_axes_and_no_line() -> None:
    chart = build_chart(Throughput(START, dt.timedelta(minutes=1), {}))

    assert chart.lines == []
    assert [label for _, label in chart.y_ticks] == ["0", "1", "2", "3", "4"]
    assert all(0 <= y <= HEIGHT for y, _ in chart.y_ticks)
