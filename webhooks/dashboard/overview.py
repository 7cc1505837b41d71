"""What the overview page reads: jobs of the last hour or day, aggregated in SQL by bucket.

Every query here is bounded by the window, never by the table: it asks for the jobs
*created* in the window (``created_at`` in [start, end)), with ``status IN (...)``
naming the statuses wanted, so that the (status, created_at) index
(``ix_jobs_status_created_at``) serves it as one range scan per status, on
PostgreSQL and on SQLite alike. Jobs are bucketed by creation rather than by their
end because no index orders jobs by ``completed_at`` (and deadlines are unbounded,
so "ended in the window" cannot be bounded by creation time either): a job is
counted in the minute it was created, coloured by how it ended, or as in flight
while it has not.

What reaches Python is bounded by the number of buckets, never by the number of
jobs: counts come back per (bucket, status), percentiles per bucket, error codes
as the top :data:`TOP_ERRORS`.

Buckets come from epoch arithmetic (seconds since 1970, minus the window's start,
divided by the bucket's width), which both databases do, rather than date_trunc,
which SQLite lacks and which cannot make 15-minute buckets anyway.

Percentiles of the time to completion (``completed_at - created_at`` of completed
jobs): PostgreSQL's ``percentile_cont``. SQLite has no percentile aggregate; there,
window functions rank each bucket's durations (``row_number()`` and ``count()``
over the bucket), and only the one or two rows each percentile lies between
come back, which Python interpolates the way percentile_cont does. Both give the
same exact answer; the database sorts the window's completed jobs either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Integer, Select, and_, cast, func, literal, or_, select
from sqlalchemy.orm import Session

from worker.db import is_postgres
from worker.models import Job
from worker.states import JobStatus

# The series of the jobs chart, in stacking order (bottom first). "in_flight" is every
# job not ended yet: the newest buckets would otherwise look like a drop in traffic.
ENDED = (JobStatus.COMPLETED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)
IN_FLIGHT = "in_flight"
SERIES = (*ENDED, IN_FLIGHT)
PERCENTILES = (0.5, 0.95)
# Error codes shown by name; the rest are added up as "other codes".
TOP_ERRORS = 12
NO_CODE = "(no code)"


@dataclass(frozen=True)
class Window:
    """A span of time the overview shows, cut into equal buckets."""

    name: str  # the ?window= value
    label: str  # "the last hour": the page's words for it
    span: timedelta
    bucket: timedelta
    tick_every: timedelta  # a labelled tick on the time axis at multiples of this (UTC)

    @property
    def bucket_count(self) -> int:
        return int(self.span / self.bucket)

    @property
    def bucket_label(self) -> str:
        minutes = int(self.bucket.total_seconds() // 60)
        return "minute" if minutes == 1 else f"{minutes} minutes"

    def bounds(self, now: datetime) -> tuple[datetime, datetime]:
        """[start, end): whole buckets, the last one holding ``now`` (so it is partial)."""
        width = int(self.bucket.total_seconds())
        end_epoch = (math.floor(now.timestamp()) // width + 1) * width
        end = datetime.fromtimestamp(end_epoch, UTC)
        return end - self.span, end


WINDOWS = {
    "hour": Window(
        "hour", "the last hour", timedelta(hours=1), timedelta(minutes=1), timedelta(minutes=10)
    ),
    "day": Window(
        "day", "the last day", timedelta(days=1), timedelta(minutes=15), timedelta(hours=3)
    ),
}
DEFAULT_WINDOW = "hour"


@dataclass(frozen=True)
class Bucket:
    start: datetime
    counts: dict[str, int]  # by SERIES name
    p50: float | None  # seconds from creation to completion, of the completed jobs
    p95: float | None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class Overview:
    window: Window
    provider: str | None
    start: datetime
    end: datetime
    buckets: tuple[Bucket, ...]
    totals: dict[str, int]  # by SERIES name, over the window
    p50: float | None  # over the window's completed jobs
    p95: float | None
    errors: tuple[tuple[str, int], ...]  # (error code, failed jobs), most first
    other_errors: int  # failed jobs whose code is not among ``errors``

    @property
    def total(self) -> int:
        return sum(self.totals.values())

    @property
    def failed(self) -> int:
        return self.totals[JobStatus.FAILED.value]


def load_overview(
    session: Session, window: Window, provider: str | None, now: datetime
) -> Overview:
    start, end = window.bounds(now)
    scope = _Scope(session, window, provider, start, end)
    counts = job_counts(scope)
    by_bucket = duration_percentiles(scope, by_bucket=True)
    overall = duration_percentiles(scope, by_bucket=False).get(0, (None, None))
    errors = error_counts(scope)
    totals = dict.fromkeys(SERIES, 0)
    for per_series in counts.values():
        for name, n in per_series.items():
            totals[name] += n
    buckets = tuple(
        Bucket(
            start=start + i * window.bucket,
            counts=counts.get(i, dict.fromkeys(SERIES, 0)),
            p50=by_bucket.get(i, (None, None))[0],
            p95=by_bucket.get(i, (None, None))[1],
        )
        for i in range(window.bucket_count)
    )
    shown = errors[:TOP_ERRORS]
    return Overview(
        window=window,
        provider=provider,
        start=start,
        end=end,
        buckets=buckets,
        totals=totals,
        p50=overall[0],
        p95=overall[1],
        errors=tuple(shown),
        other_errors=totals[JobStatus.FAILED.value] - sum(n for _, n in shown),
    )


# --- the queries -----------------------------------------------------------------


@dataclass(frozen=True)
class _Scope:
    """The jobs one overview is about: created in [start, end), of one provider or all."""

    session: Session
    window: Window
    provider: str | None
    start: datetime
    end: datetime

    @property
    def postgres(self) -> bool:
        return is_postgres(self.session)

    def where(self, statuses: Iterable[str]) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = [
            # Listed even when every status is wanted: the index leads with status.
            Job.status.in_(sorted(statuses)),
            Job.created_at >= self.start,
            Job.created_at < self.end,
        ]
        if self.provider is not None:
            # SQLite has no statistics (nothing runs ANALYZE): left indexable, provider = ?
            # AND status IN (...) makes it pick the (provider, status, account) index and
            # read every job the provider ever had. An expression is not indexable, so
            # the window's range on (status, created_at) bounds the read there too.
            provider = Job.provider if self.postgres else Job.provider.concat("")
            conditions.append(provider == self.provider)
        return conditions

    def bucket(self) -> ColumnElement[int]:
        """The index of a job's bucket: whole seconds since the window's start, divided by
        the bucket's width (both whole seconds, and the start is a multiple of the width,
        so dropping a creation time's fraction of a second moves no job to another bucket)."""
        start = int(self.start.timestamp())
        width = int(self.window.bucket.total_seconds())
        if self.postgres:
            seconds: ColumnElement[Any] = cast(
                func.floor(func.extract("epoch", Job.created_at)), Integer
            )
        else:
            # Cut to whole seconds as text ("YYYY-MM-DD HH:MM:SS", SQLite's storage) first:
            # strftime rounds to the millisecond, so 12:30:59.9996 would count as 12:31.
            whole = func.substr(Job.created_at, 1, 19)
            seconds = cast(func.strftime("%s", whole), Integer)
        # Integer // integer: integer division on both databases (never negative here).
        return (seconds - start) // width

    def seconds_to_complete(self) -> ColumnElement[Any]:
        if self.postgres:
            return func.extract("epoch", Job.completed_at - Job.created_at)
        # julianday: days as a float, good to some microseconds for today's dates; rounded
        # to the millisecond, a whole number of seconds comes out whole.
        days = func.julianday(Job.completed_at) - func.julianday(Job.created_at)
        return func.round(days * 86400.0, 3)

    def select(self, *columns: Any) -> Select[Any]:
        return select(*columns).select_from(Job)


def job_counts(scope: _Scope) -> dict[int, dict[str, int]]:
    """Jobs per bucket per series (an ended status, or in flight): bucket count x 6 rows."""
    bucket = scope.bucket().label("bucket")
    rows = scope.session.execute(
        scope.select(bucket, Job.status, func.count())
        .where(*scope.where(s.value for s in JobStatus))
        .group_by(bucket, Job.status)
    )
    counts: dict[int, dict[str, int]] = {}
    for index, status, n in rows:
        series = status if status in ENDED else IN_FLIGHT
        per_series = counts.setdefault(int(index), dict.fromkeys(SERIES, 0))
        per_series[series] += int(n)
    return counts


def duration_percentiles(
    scope: _Scope, by_bucket: bool
) -> dict[int, tuple[float | None, float | None]]:
    """p50 and p95 of the seconds from creation to completion of the completed jobs, per
    bucket (or over the whole window, as bucket 0)."""
    bucket: ColumnElement[Any] = scope.bucket() if by_bucket else literal(0)
    seconds = scope.seconds_to_complete()
    conditions = [*scope.where([JobStatus.COMPLETED.value]), Job.completed_at.is_not(None)]
    if scope.postgres:
        labelled = bucket.label("bucket")
        query = scope.select(
            labelled, *(func.percentile_cont(p).within_group(seconds) for p in PERCENTILES)
        ).where(*conditions)
        if by_bucket:
            query = query.group_by(labelled)
        return {
            int(index): (_float(p50), _float(p95))
            for index, p50, p95 in scope.session.execute(query)
        }
    return _ranked_percentiles(scope, bucket, seconds, conditions)


def _ranked_percentiles(
    scope: _Scope,
    bucket: ColumnElement[Any],
    seconds: ColumnElement[Any],
    conditions: Sequence[ColumnElement[bool]],
) -> dict[int, tuple[float | None, float | None]]:
    """SQLite's percentile_cont: rank each bucket's durations and fetch only the rows
    around each percentile's position (at most 4 rows a bucket)."""
    ranked = (
        scope.select(
            bucket.label("bucket"),
            seconds.label("seconds"),
            (func.row_number().over(partition_by=bucket, order_by=seconds) - 1).label("rank"),
            func.count().over(partition_by=bucket).label("n"),
        )
        .where(*conditions)
        .subquery()
    )
    near = []
    for p in PERCENTILES:
        # CAST(... AS INTEGER) truncates: the floor of a position that is never negative.
        below = cast(literal(p) * (ranked.c.n - 1), Integer)
        near.append(and_(ranked.c.rank >= below, ranked.c.rank <= below + 1))
    rows = scope.session.execute(
        select(ranked.c.bucket, ranked.c.n, ranked.c.rank, ranked.c.seconds).where(or_(*near))
    )
    values: dict[int, dict[int, float]] = {}
    sizes: dict[int, int] = {}
    for index, n, rank, value in rows:
        values.setdefault(int(index), {})[int(rank)] = float(value)
        sizes[int(index)] = int(n)
    found: dict[int, tuple[float | None, float | None]] = {}
    for index, n in sizes.items():
        p50, p95 = (interpolate(values[index], n, p) for p in PERCENTILES)
        found[index] = (p50, p95)
    return found


def interpolate(ranked: dict[int, float], n: int, p: float) -> float:
    """percentile_cont(p) of ``n`` sorted values, given (at least) the values at ranks
    floor(p*(n-1)) and the one after it, as PostgreSQL computes it."""
    position = p * (n - 1)
    below = math.floor(position)
    fraction = position - below
    if fraction == 0:
        return ranked[below]
    return ranked[below] + fraction * (ranked[below + 1] - ranked[below])


def error_counts(scope: _Scope) -> list[tuple[str, int]]:
    """Failed jobs by error code, most first (then by code, none first), the top
    TOP_ERRORS + 1 (one more than shown: whether any is left out)."""
    n = func.count().label("n")
    # Coalesced: the databases put NULL at opposite ends of an ascending order.
    code = func.coalesce(Job.error_code, "").label("code")
    rows = scope.session.execute(
        scope.select(code, n)
        .where(*scope.where([JobStatus.FAILED.value]))
        .group_by(code)
        .order_by(n.desc(), code)
        .limit(TOP_ERRORS + 1)
    )
    return [(code or NO_CODE, int(count)) for code, count in rows]


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
