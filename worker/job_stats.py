"""What the database knows, read when Prometheus scrapes: jobs by status, polling lag.

Two small queries, cached per process for :data:`STATS_TTL` seconds, so that
several scrapers (or several gunicorn threads) do not each run them.

Also here, for the capacity gauges (webhooks/metrics.py), the dashboard and the
CLI: why queued jobs wait for capacity, as a small fixed set of kinds
(:func:`wait_reason_kind`) and counted by provider and kind (:func:`query_waiting`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Generic, TypeVar

from sqlalchemy import Engine, case, func, literal, select, union_all
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from worker.models import Job, utcnow
from worker.states import ACTIVE_UPSTREAM_STATUSES, JobStatus

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)
T = TypeVar("T")

# Per process: a scrape within this many seconds of the last query reuses it.
STATS_TTL = 5.0
ACTIVE = sorted(s.value for s in ACTIVE_UPSTREAM_STATUSES)

# Why a job waits, by how its waiting_reason starts (the texts worker/capacity.py
# writes). A reason joining several accounts' starts with the first one's, which
# names it. Kinds, not texts, become label values: texts carry counts and times.
WAIT_REASON_PREFIXES: tuple[tuple[str, str], ...] = (
    ("waiting for a slot", "slot"),
    ("rate limit", "rate"),
    ("daily budget", "budget"),
    ("daily spend cap", "budget"),
    ("paused until", "paused"),
    ("circuit ", "breaker"),  # "circuit open until ...", "circuit half open ..."
)
WAIT_REASONS = ("slot", "rate", "budget", "paused", "breaker", "other")


@dataclass(frozen=True)
class JobStats:
    counts: dict[str, int]
    oldest_next_poll_at: datetime | None  # among submitted/processing jobs


def query_job_stats(engine: Engine) -> JobStats:
    """Two statements: jobs by status, and the oldest next_poll_at of active jobs.

    The GROUP BY reads every row of ``jobs``: on PostgreSQL the (status, ...)
    indexes make it an index-only scan (given a vacuumed visibility map), still
    proportional to the table. That is acceptable at scrape intervals with the
    per-process cache below; a very large table would want counts kept in a
    summary table, or terminal jobs archived away.

    The oldest next_poll_at is one MIN per active status, each answered by the
    first entry of ix_jobs_status_next_poll_at, whatever the table size.
    """
    per_status = [
        select(func.min(Job.next_poll_at).label("at")).where(Job.status == status)
        for status in ACTIVE
    ]
    oldest = union_all(*per_status).subquery()
    with engine.connect() as conn:
        counts = {
            str(status): int(count)
            for status, count in conn.execute(select(Job.status, func.count()).group_by(Job.status))
        }
        at = conn.execute(select(func.min(oldest.c.at))).scalar_one_or_none()
    return JobStats(counts, at)


def wait_reason_kind(reason: str | None) -> str:
    """The kind of a waiting_reason: one of :data:`WAIT_REASONS` (``other`` for a text
    this version does not know, or none)."""
    for prefix, kind in WAIT_REASON_PREFIXES:
        if reason is not None and reason.startswith(prefix):
            return kind
    return "other"


def query_waiting(session: Session) -> dict[tuple[str, str], int]:
    """Queued jobs waiting for capacity, by (provider, kind of reason), in one query.

    The kind is worked out in SQL from the same prefixes as :func:`wait_reason_kind`,
    so the rows are a handful whatever the number of waiting jobs; grouped in an outer
    query because PostgreSQL cannot tell that a CASE with bound parameters in the
    SELECT is the same expression as in the GROUP BY.
    """
    reason = Job.waiting_reason
    kind = case(
        *(
            (reason.startswith(prefix, autoescape=True), kind)
            for prefix, kind in WAIT_REASON_PREFIXES
        ),
        else_=literal("other"),
    ).label("kind")
    waiting = (
        select(Job.provider.label("provider"), kind)
        .where(Job.status == JobStatus.QUEUED.value, reason.is_not(None))
        .subquery()
    )
    rows = session.execute(
        select(waiting.c.provider, waiting.c.kind, func.count()).group_by(
            waiting.c.provider, waiting.c.kind
        )
    )
    return {(str(provider), str(kind)): int(count) for provider, kind, count in rows}


class ScrapeCache(Generic[T]):
    """The last value computed for a key, reused for ``ttl`` seconds: several scrapers
    (or gunicorn threads) at once wait for one computation instead of each running it.
    A value for another key (another database) is computed again."""

    def __init__(self, ttl: float = STATS_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._entry: tuple[Hashable, float, T] | None = None

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        with self._lock:
            now = self.clock()
            entry = self._entry
            if entry is not None and entry[0] == key and now < entry[1]:
                return entry[2]
            value = compute()
            self._entry = (key, now + self.ttl, value)
            return value

    def clear(self) -> None:
        with self._lock:
            self._entry = None


class JobStatsCache(ScrapeCache[JobStats]):
    """The last JobStats of this process (per database)."""

    def stats(self, engine: Engine) -> JobStats:
        key = engine.url.render_as_string(hide_password=False)
        return self.get(key, lambda: query_job_stats(engine))


job_stats_cache = JobStatsCache()


class JobStatsCollector:
    """Gauges computed from the database when scraped: jobs by status, polling lag."""

    def __init__(self, engine: Engine, cache: JobStatsCache | None = None) -> None:
        self.engine = engine
        self.cache = cache or job_stats_cache

    def describe(self) -> Iterable[Metric]:
        return list(self._families(JobStats({}, None)))

    def collect(self) -> Iterable[Metric]:
        try:
            stats = self.cache.stats(self.engine)
        except SQLAlchemyError as exc:
            # The file-based metrics are still worth serving; these series go
            # missing, which absent() alerts see.
            log.warning("metrics: job stats unavailable (%s)", type(exc).__name__)
            return []
        return list(self._families(stats))

    @staticmethod
    def _families(stats: JobStats) -> Iterable[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        jobs = GaugeMetricFamily(
            "variflow_jobs", "Jobs currently in each status.", labels=["status"]
        )
        for status in JobStatus:
            jobs.add_metric([status.value], stats.counts.get(status.value, 0))
        yield jobs
        lag = 0.0
        if stats.oldest_next_poll_at is not None:
            lag = max(0.0, (utcnow() - stats.oldest_next_poll_at).total_seconds())
        yield GaugeMetricFamily(
            "variflow_polling_lag_seconds",
            "How long the most overdue submitted/processing job has been due for a poll "
            "(0 when none is due).",
            value=lag,
        )
