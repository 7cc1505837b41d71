"""Prometheus metrics, shared by every variflow process through one folder.

Celery runs prefork children and gunicorn several workers, so each process
writes its samples to its own files in a shared folder (prometheus-client's
multiprocess mode) and the web app's ``GET /metrics`` adds them up. The folder
is ``VARIFLOW_METRICS_DIR`` (default ``$VARIFLOW_HOME/metrics``); every process
of one deployment must see the same folder.

prometheus-client picks its storage when ``prometheus_client.values`` is
imported, from ``PROMETHEUS_MULTIPROC_DIR``. Settings are never read at import
time, so nothing here touches prometheus-client until the first sample:
:func:`get_metrics` then sets the variable from the settings, imports the
library and installs its own storage in the folder — even if something imported
the library earlier, or for another folder (tests switch folders per test) —
with files named by host and pid, as containers sharing the folder reuse pids.

What is counted here, at the moment it happens: webhook deliveries (the web
app), upstream HTTP calls (``providers/base.py: send``), jobs reaching a
terminal state (an ``on_terminal`` hook, after commit). What the database
knows (jobs by status, polling lag) is read at scrape time by
:class:`JobStatsCollector`, with two small queries cached per process.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from celery.signals import worker_process_shutdown
from sqlalchemy import func, select, union_all
from sqlalchemy.exc import SQLAlchemyError

from worker.config import KNOWN_PROVIDERS, Settings, get_settings
from worker.db import get_engine
from worker.hooks import TerminalJob, on_terminal
from worker.models import Job, utcnow
from worker.states import ACTIVE_UPSTREAM_STATUSES, JobStatus

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The text format generate_latest() writes (CONTENT_TYPE_LATEST differs between versions).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

WEBHOOK_OUTCOMES = (
    "accepted",  # a transition or new progress was applied
    "duplicate",  # the job already had the reported status
    "stale",  # an older or conflicting status, ignored
    "unauthorized",  # 401: missing or wrong secret
    "bad_request",  # 400: malformed body, no task id
    "not_found",  # 404: unknown provider, job or task id
    "conflict",  # 409: the task id is not the job's
    "too_large",  # 413: body over the limit
    "error",  # anything else (5xx)
)
UPSTREAM_OUTCOMES = (
    "ok",  # an HTTP answer below 400 (the adapter may still reject its body)
    "transient_error",  # 429, 500, 502, 503, 504: retried later
    "client_error",  # any other 4xx: the job fails with the provider's message
    "server_error",  # any other 5xx (501, 505, ...): treated as permanent too
    "transport_error",  # no HTTP answer: connection failure, timeout
)
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 180)
JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 21600)
# Per process: a scrape within this many seconds of the last query reuses it.
STATS_TTL = 5.0


def metrics_dir(settings: Settings | None = None) -> Path:
    settings = settings or get_settings()
    return (settings.metrics_dir or settings.home / "metrics").resolve()


@dataclass(frozen=True)
class Metrics:
    """This process's metric objects, bound to one folder."""

    settings: Settings
    folder: Path
    webhook_deliveries: Counter
    upstream_requests: Counter
    upstream_duration: Histogram
    jobs_terminal: Counter
    job_duration: Histogram


_lock = threading.Lock()
_current: Metrics | None = None
_bound_folder: Path | None = None  # the folder prometheus-client's storage writes to


def _prepare_folder(settings: Settings) -> Path:
    folder = metrics_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


def process_id(pid: int | None = None) -> str:
    """What a process's files are named by: its host and pid.

    prometheus-client's default is the pid alone, but the web and worker
    containers of one deployment share the folder and each container has its
    own pids: two processes with pid 7 would write to one file.
    """
    return f"{_host()}-{os.getpid() if pid is None else pid}"


@functools.cache
def _host() -> str:
    # No "_": prometheus-client splits file names on it.
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


def _close_files(value_class: Any) -> None:
    close = getattr(value_class, "close_all_files", None)  # not in every version
    if close is not None:
        close()


def _bind_storage(settings: Settings) -> Path:
    """Set MULTIPROC_ENV, then make prometheus-client store values in the folder."""
    global _bound_folder
    folder = _prepare_folder(settings)
    from prometheus_client import values  # after MULTIPROC_ENV is set

    if _bound_folder != folder:
        # Our own storage whatever the library chose when imported (which may
        # have been before MULTIPROC_ENV was set): files named by process_id().
        if _bound_folder is not None:
            _close_files(values.ValueClass)
        values.ValueClass = values.MultiProcessValue(process_identifier=process_id)  # type: ignore[no-untyped-call]
        _bound_folder = folder
    return folder


def _create(settings: Settings) -> Metrics:
    folder = _bind_storage(settings)
    from prometheus_client import Counter, Histogram

    # registry=None: samples go to the folder's files; /metrics reads them
    # through a MultiProcessCollector, never through a registry of this process.
    return Metrics(
        settings=settings,
        folder=folder,
        webhook_deliveries=Counter(
            "variflow_webhook_deliveries",
            "Provider webhook deliveries received, by outcome.",
            ["provider", "outcome"],
            registry=None,
        ),
        upstream_requests=Counter(
            "variflow_upstream_requests",
            "HTTP requests to providers, by operation and outcome.",
            ["provider", "operation", "outcome"],
            registry=None,
        ),
        upstream_duration=Histogram(
            "variflow_upstream_request_duration_seconds",
            "Time to a provider's HTTP answer (or to the transport failure).",
            ["provider", "operation"],
            buckets=UPSTREAM_BUCKETS,
            registry=None,
        ),
        jobs_terminal=Counter(
            "variflow_jobs_terminal",
            "Jobs that reached a terminal status.",
            ["provider", "status"],
            registry=None,
        ),
        job_duration=Histogram(
            "variflow_job_duration_seconds",
            "From the provider accepting a job (or its creation, if never accepted) "
            "to its terminal status.",
            ["provider", "status"],
            buckets=JOB_BUCKETS,
            registry=None,
        ),
    )


def get_metrics() -> Metrics:
    """The metric objects for the current settings, created on first use."""
    global _current
    settings = get_settings()
    current = _current
    if current is not None and current.settings is settings:
        return current
    with _lock:
        if _current is None or _current.settings is not settings:
            _current = _create(settings)
        return _current


def reset_metrics() -> None:
    """Forget the metric objects, the storage binding and the cached job stats (tests)."""
    global _current, _bound_folder
    with _lock:
        _current = None
        if _bound_folder is not None:
            from prometheus_client import values

            _close_files(values.ValueClass)
            values.ValueClass = values.MutexValue
            _bound_folder = None
        os.environ.pop(MULTIPROC_ENV, None)
    job_stats_cache.clear()


def _safely(what: str, record: Callable[[], None]) -> None:
    # A metric must never fail the work it describes (a full disk, a bad folder).
    try:
        record()
    except Exception:
        log.warning("metrics: could not record %s", what, exc_info=True)


def _provider_label(provider: str) -> str:
    # Provider names can come from a URL: only known ones become label values.
    return provider if provider in KNOWN_PROVIDERS else "unknown"


# -- what happens -------------------------------------------------------------


def count_webhook(provider: str, outcome: str) -> None:
    _safely(
        "a webhook delivery",
        lambda: get_metrics().webhook_deliveries.labels(_provider_label(provider), outcome).inc(),
    )


def upstream_outcome(status_code: int, *, transient: bool) -> str:
    """The outcome label of an HTTP answer (see UPSTREAM_OUTCOMES).

    ``transient``: send() retries this status (providers/base.py decides which).
    """
    if transient:
        return "transient_error"
    if status_code < 400:
        return "ok"
    return "client_error" if status_code < 500 else "server_error"


def observe_upstream(provider: str, operation: str, outcome: str, seconds: float) -> None:
    def record() -> None:
        metrics = get_metrics()
        label = _provider_label(provider)
        metrics.upstream_requests.labels(label, operation, outcome).inc()
        metrics.upstream_duration.labels(label, operation).observe(max(0.0, seconds))

    _safely("an upstream request", record)


@on_terminal
def observe_terminal(job: TerminalJob) -> None:
    """Count a job that reached a terminal status (called after the commit)."""

    def record() -> None:
        metrics = get_metrics()
        label = _provider_label(job.provider)
        started = job.submitted_at or job.created_at
        seconds = max(0.0, (job.completed_at - started).total_seconds())
        metrics.jobs_terminal.labels(label, job.status).inc()
        metrics.job_duration.labels(label, job.status).observe(seconds)

    _safely("a terminal job", record)


# -- what the database knows, at scrape time ----------------------------------


@dataclass(frozen=True)
class JobStats:
    counts: dict[str, int]
    oldest_next_poll_at: datetime | None  # among submitted/processing jobs


ACTIVE = sorted(s.value for s in ACTIVE_UPSTREAM_STATUSES)


def query_job_stats() -> JobStats:
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
    with get_engine().connect() as conn:
        counts = {
            str(status): int(count)
            for status, count in conn.execute(select(Job.status, func.count()).group_by(Job.status))
        }
        at = conn.execute(select(func.min(oldest.c.at))).scalar_one_or_none()
    return JobStats(counts, at)


class JobStatsCache:
    """The last JobStats of this process, reused for ``ttl`` seconds."""

    def __init__(self, ttl: float = STATS_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._entry: tuple[str, float, JobStats] | None = None

    def get(self) -> JobStats:
        key = get_settings().database_url
        with self._lock:  # concurrent scrapes wait for one query instead of each running it
            now = self.clock()
            entry = self._entry
            if entry is not None and entry[0] == key and now < entry[1]:
                return entry[2]
            stats = query_job_stats()
            self._entry = (key, now + self.ttl, stats)
            return stats

    def clear(self) -> None:
        with self._lock:
            self._entry = None


job_stats_cache = JobStatsCache()


class JobStatsCollector:
    """Gauges computed from the database when scraped: jobs by status, polling lag."""

    def __init__(self, cache: JobStatsCache | None = None) -> None:
        self.cache = cache or job_stats_cache

    def describe(self) -> Iterable[Metric]:
        return list(self._families(JobStats({}, None)))

    def collect(self) -> Iterable[Metric]:
        try:
            stats = self.cache.get()
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


def build_registry() -> CollectorRegistry:
    """A fresh registry: every process's samples from the folder, plus the job stats."""
    metrics = get_metrics()
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics.folder))  # type: ignore[no-untyped-call]
    registry.register(cast("Any", JobStatsCollector()))
    return registry


def render_latest() -> bytes:
    """The Prometheus text exposition of everything (what GET /metrics answers)."""
    from prometheus_client import generate_latest

    return generate_latest(build_registry())


# -- process exits ------------------------------------------------------------


def mark_process_dead(pid: int) -> None:
    """Drop a dead process's live-gauge files (no-op for counters and histograms, kept)."""
    folder = _prepare_folder(get_settings())
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(process_id(pid), str(folder))  # type: ignore[no-untyped-call]


def _on_worker_process_shutdown(pid: int | None = None, **_: Any) -> None:
    _safely("a process exit", lambda: mark_process_dead(pid or os.getpid()))


# A Celery prefork child is ending. Connected when this module is imported,
# which worker/celery_app.py does so that every worker has it.
worker_process_shutdown.connect(_on_worker_process_shutdown, weak=False)
