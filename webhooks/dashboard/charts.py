"""The overview's charts as geometry for inline SVG: positions, sizes and labels.

Drawn on the server, not by a charting library in the browser: the dashboard's
policy allows one script (by its hash) and nothing from elsewhere, and
operators may have no internet. Nor by a Python charting library: pygal, the
well-kept one that writes SVG, puts ~50 KB of its own CSS into every chart and
needs its JavaScript (from a CDN) for the values on hover; here a hover shows
each bar's numbers through plain SVG <title> elements, and the colours are the
page's own CSS classes (``s-<series>``), shared by the bars and the legend.

Everything here is arithmetic on the overview's numbers; the template
(dashboard_overview.html) writes the elements. Coordinates are in the SVG's
viewBox units; the SVG scales to the page's width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from webhooks.dashboard.overview import IN_FLIGHT, SERIES, Bucket, Overview

SERIES_LABELS = {
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
    IN_FLIGHT: "in flight",
}
# Drawn in this order, p50 over p95: where both are one job's time, p50's smaller dot
# sits inside p95's (LINE_DOT_RADIUS), and both show. The legend lists them p50 first.
LINES = (("p95", "p95"), ("p50", "p50"))
LINE_DOT_RADIUS = {"p95": 4.5, "p50": 3.0}
MAX_Y_TICKS = 5
HEADROOM = 1.05
# What fits the error chart's label column (codes are up to 64 characters).
MAX_CODE_CHARS = 34


@dataclass(frozen=True)
class Frame:
    """The SVG's size and the plot area inside it (margins hold the axes' labels)."""

    width: float = 960.0
    height: float = 220.0
    left: float = 56.0
    right: float = 12.0
    top: float = 12.0
    bottom: float = 28.0

    @property
    def plot_width(self) -> float:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> float:
        return self.height - self.top - self.bottom

    @property
    def base(self) -> float:
        """The y of the x axis (value 0)."""
        return self.top + self.plot_height


@dataclass(frozen=True)
class Tick:
    at: float  # x for the time axis, y for a value axis
    label: str


@dataclass(frozen=True)
class Rect:
    series: str
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Column:
    """One bucket's stacked bar: its parts bottom first, and what a hover says."""

    title: str
    rects: tuple[Rect, ...]


@dataclass(frozen=True)
class Dot:
    x: float
    y: float
    title: str


@dataclass(frozen=True)
class Line:
    name: str  # "p50" or "p95": its CSS class is s-<name>
    label: str
    runs: tuple[str, ...]  # polyline points of consecutive buckets with a value
    dots: tuple[Dot, ...]

    @property
    def dot_radius(self) -> float:
        return LINE_DOT_RADIUS[self.name]


@dataclass(frozen=True)
class BarChart:
    frame: Frame
    columns: tuple[Column, ...]
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    legend: tuple[tuple[str, str], ...]  # (series, label)


@dataclass(frozen=True)
class LineChart:
    frame: Frame
    lines: tuple[Line, ...]
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    unit: str


@dataclass(frozen=True)
class ErrorBar:
    code: str
    count: int
    y: float
    width: float

    @property
    def label(self) -> str:
        """The code as written beside its bar (in full on hover)."""
        return (
            self.code if len(self.code) <= MAX_CODE_CHARS else self.code[: MAX_CODE_CHARS - 1] + "…"
        )


@dataclass(frozen=True)
class ErrorChart:
    width: float
    height: float
    label_width: float  # the codes' column, left of the bars
    row_height: float
    bars: tuple[ErrorBar, ...]


# --- scales ------------------------------------------------------------------------


def nice_scale(largest: float, integers: bool = False) -> tuple[float, float]:
    """The top of an axis above ``largest`` (with a little room, so that the tallest bar
    or line does not touch the frame) and the step between its ticks: 1, 2, 2.5 or 5
    times a power of ten, at most MAX_Y_TICKS steps (whole steps for counts)."""
    if largest <= 0:
        return 1.0, 1.0
    largest *= HEADROOM
    rough = largest / MAX_Y_TICKS
    power = 10.0 ** math.floor(math.log10(rough))
    steps = [m * power for m in (1, 2, 2.5, 5, 10)]
    if integers:
        steps = [max(1.0, step) for step in steps if step >= 1 and step == int(step)] or [1.0]
    step = next((s for s in steps if s >= rough), steps[-1])
    return math.ceil(largest / step - 1e-9) * step, step


def _value_ticks(frame: Frame, top: float, step: float, unit: str = "") -> tuple[Tick, ...]:
    count = round(top / step)
    return tuple(
        Tick(frame.base - frame.plot_height * (i * step) / top, f"{_number(i * step)}{unit}")
        for i in range(count + 1)
    )


def _number(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:g}"


def _slot(frame: Frame, count: int) -> float:
    return frame.plot_width / count


def time_ticks(frame: Frame, overview: Overview) -> tuple[Tick, ...]:
    """A labelled tick at each bucket that starts on a multiple of the window's tick
    interval (every 10 minutes of the hour, every 3 hours of the day), in UTC."""
    every = int(overview.window.tick_every.total_seconds())
    slot = _slot(frame, len(overview.buckets))
    return tuple(
        Tick(frame.left + i * slot, bucket.start.strftime("%H:%M"))
        for i, bucket in enumerate(overview.buckets)
        if int(bucket.start.timestamp()) % every == 0
    )


def _when(overview: Overview, bucket: Bucket) -> str:
    end = bucket.start + overview.window.bucket
    if overview.window.bucket.total_seconds() <= 60:
        return f"{bucket.start:%H:%M} UTC"
    return f"{bucket.start:%H:%M} to {end:%H:%M} UTC"


# --- the charts ----------------------------------------------------------------------


def jobs_chart(overview: Overview, frame: Frame | None = None) -> BarChart:
    """Jobs per bucket, stacked by how they ended (in flight on top)."""
    frame = frame or Frame()
    top, step = nice_scale(max((b.total for b in overview.buckets), default=0), integers=True)
    slot = _slot(frame, len(overview.buckets))
    gap = max(1.0, slot * 0.2)
    columns = []
    for i, bucket in enumerate(overview.buckets):
        x = frame.left + i * slot + gap / 2
        y = frame.base
        rects = []
        for series in SERIES:
            n = bucket.counts[series]
            if n:
                height = frame.plot_height * n / top
                y -= height
                rects.append(Rect(series, x, y, slot - gap, height))
        parts = ", ".join(f"{bucket.counts[s]} {SERIES_LABELS[s]}" for s in SERIES)
        title = f"{_when(overview, bucket)}: {bucket.total} jobs ({parts})"
        columns.append(Column(title, tuple(rects)))
    return BarChart(
        frame=frame,
        columns=tuple(columns),
        y_ticks=_value_ticks(frame, top, step),
        x_ticks=time_ticks(frame, overview),
        legend=tuple((s, SERIES_LABELS[s]) for s in SERIES),
    )


def duration_unit(largest: float) -> tuple[str, float]:
    """The unit a duration axis is labelled in, and its seconds."""
    if largest < 120:
        return " s", 1.0
    if largest < 2 * 3600:
        return " min", 60.0
    return " h", 3600.0


def seconds_text(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def duration_chart(overview: Overview, frame: Frame | None = None) -> LineChart:
    """p50 and p95 of the time to completion per bucket, as lines broken where a bucket
    has no completed job."""
    frame = frame or Frame()
    values = [v for b in overview.buckets for v in (b.p50, b.p95) if v is not None]
    unit, seconds = duration_unit(max(values, default=0.0))
    top, step = nice_scale(max(values, default=0.0) / seconds)
    slot = _slot(frame, len(overview.buckets))
    lines = []
    for name, label in LINES:
        runs: list[str] = []
        run: list[str] = []
        dots = []
        for i, bucket in enumerate(overview.buckets):
            value = getattr(bucket, name)
            if value is None:
                if run:
                    runs.append(" ".join(run))
                run = []
                continue
            x = frame.left + (i + 0.5) * slot
            y = frame.base - frame.plot_height * (value / seconds) / top
            run.append(f"{x:.1f},{y:.1f}")
            dots.append(Dot(x, y, f"{_when(overview, bucket)}: {label} {seconds_text(value)}"))
        if run:
            runs.append(" ".join(run))
        lines.append(Line(name, label, tuple(runs), tuple(dots)))
    return LineChart(
        frame=frame,
        lines=tuple(lines),
        y_ticks=_value_ticks(frame, top, step, unit),
        x_ticks=time_ticks(frame, overview),
        unit=unit.strip(),
    )


def error_chart(
    errors: Sequence[tuple[str, int]], width: float = 960.0, label_width: float = 260.0
) -> ErrorChart:
    """One horizontal bar per error code, longest for the most frequent."""
    row = 26.0
    largest = max((n for _, n in errors), default=1)
    room = width - label_width - 70.0  # the count is written after the bar
    bars = tuple(
        ErrorBar(code, n, i * row, max(2.0, room * n / largest))
        for i, (code, n) in enumerate(errors)
    )
    return ErrorChart(width, max(row, row * len(bars)), label_width, row, bars)
