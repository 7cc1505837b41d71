"""The overview's chart geometry (webhooks/dashboard/charts.py): pure arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from webhooks.dashboard.charts import (
    Frame,
    duration_chart,
    error_chart,
    jobs_chart,
    nice_scale,
    seconds_text,
)
from webhooks.dashboard.overview import IN_FLIGHT, SERIES, WINDOWS, Bucket, Overview

NOW = datetime(2026, 3, 1, 12, 30, 20, tzinfo=UTC)


def make_overview(
    counts: dict[int, dict[str, int]], times: dict[int, tuple[float, float]] | None = None
) -> Overview:
    window = WINDOWS["hour"]
    start, end = window.bounds(NOW)
    times = times or {}
    buckets = tuple(
        Bucket(
            start + i * window.bucket,
            dict.fromkeys(SERIES, 0) | counts.get(i, {}),
            *times.get(i, (None, None)),
        )
        for i in range(window.bucket_count)
    )
    totals = {s: sum(b.counts[s] for b in buckets) for s in SERIES}
    return Overview(window, None, start, end, buckets, totals, None, None, (), 0)


@pytest.mark.parametrize(
    ("largest", "integers", "expected"),
    [
        (0, True, (1.0, 1.0)),
        (1, True, (2.0, 1.0)),
        (7, True, (8.0, 2.0)),
        (105, True, (125.0, 25.0)),
        (20, False, (25.0, 5.0)),
        (0.4, False, (0.5, 0.1)),
    ],
)
def test_nice_scales_leave_room_above_the_largest(
    largest: float, integers: bool, expected: tuple[float, float]
) -> None:
    top, step = nice_scale(largest, integers)
    assert (top, step) == pytest.approx(expected)
    assert top > largest or largest == 0
    assert top / step <= 5


def test_stacked_bars_are_as_tall_as_their_counts() -> None:
    frame = Frame()
    chart = jobs_chart(make_overview({3: {"completed": 2, "failed": 1, IN_FLIGHT: 1}}), frame)
    assert len(chart.columns) == 60
    assert all(not c.rects for i, c in enumerate(chart.columns) if i != 3)
    rects = chart.columns[3].rects
    assert [r.series for r in rects] == ["completed", "failed", IN_FLIGHT]  # bottom first
    top = chart.y_ticks[-1]
    per_job = (frame.base - top.at) / float(top.label)
    assert [r.height for r in rects] == pytest.approx([2 * per_job, per_job, per_job])
    assert rects[0].y + rects[0].height == pytest.approx(frame.base)  # standing on the axis
    assert rects[1].y + rects[1].height == pytest.approx(rects[0].y)  # stacked
    assert "4 jobs (2 completed, 1 failed, 0 cancelled, 1 in flight)" in chart.columns[3].title
    # A labelled tick every 10 minutes (UTC): the window starts at 11:31.
    assert [t.label for t in chart.x_ticks] == [
        "11:40",
        "11:50",
        "12:00",
        "12:10",
        "12:20",
        "12:30",
    ]


def test_lines_break_where_no_job_completed() -> None:
    overview = make_overview({}, {0: (10.0, 20.0), 1: (12.0, 30.0), 5: (4.0, 4.0)})
    chart = duration_chart(overview)
    p50 = next(line for line in chart.lines if line.name == "p50")
    assert len(p50.runs) == 2 and len(p50.dots) == 3
    assert len(p50.runs[0].split()) == 2 and len(p50.runs[1].split()) == 1
    assert chart.unit == "s" and chart.y_ticks[-1].label == "40 s"


def test_long_times_are_labelled_in_minutes_or_hours() -> None:
    assert duration_chart(make_overview({}, {0: (300.0, 900.0)})).unit == "min"
    assert duration_chart(make_overview({}, {0: (300.0, 9000.0)})).unit == "h"
    assert [seconds_text(s) for s in (0.25, 8.04, 42.4, 90, 7200)] == [
        "250 ms",
        "8.0 s",
        "42 s",
        "1.5 min",
        "2.0 h",
    ]


def test_error_bars_are_as_long_as_their_counts() -> None:
    chart = error_chart([("timeout", 4), ("x" * 64, 2)])
    assert chart.bars[1].width == pytest.approx(chart.bars[0].width / 2)
    assert chart.bars[1].label.endswith("…") and len(chart.bars[1].label) <= 34
    assert error_chart([]).bars == ()
