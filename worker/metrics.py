"""Prometheus metrics: the counters variflow keeps, shared by every process through one folder.

Celery runs prefork children and gunicorn several workers, so each process
writes its samples to its own files in a shared folder (prometheus-client's
multiprocess mode) and the web app's ``GET /metrics`` adds them up. The folder
is set by each process's entry point with :func:`configure` (from
``VARIFLOW_METRICS_DIR``, default ``$VARIFLOW_HOME/metrics``); every process of
one deployment must see the same folder. Until then, recording is a no-op.

prometheus-client picks its storage when ``prometheus_client.values`` is
imported, from ``PROMETHEUS_MULTIPROC_DIR``, so nothing here touches the
library until the first sample: :func:`get_metrics` then sets the variable,
imports the library and installs its own storage in the folder — even if
something imported the library earlier, or for another folder (tests switch
folders per test) — with files named by host and pid, as containers sharing
the folder reuse pids.

What is counted here, at the moment it happens: webhook deliveries (the web
app), upstream HTTP calls (``providers/base.py: send``), jobs reaching a
terminal state (a consumer of "a job ended", after commit), how long a job
waited for provider capacity (when it is admitted). What the database knows
(jobs by status, polling lag, accounts' capacity) is read at scrape time
(worker/job_stats.py, webhooks/metrics.py). This module is on the ground
floor: it imports nothing of variflow but its status values.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.status import TerminalJob

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram

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
# A job waits for capacity from seconds (a slot, a rate turn) to a day (a daily budget
# resumes at 00:00 UTC), so the buckets reach 24 h.
CAPACITY_WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 43200, 86400)


@dataclass(frozen=True)
class Target:
    """Where this process's samples go, and which provider names may be label values."""

    folder: Path
    providers: frozenset[str]


@dataclass(frozen=True)
class Metrics:
    """This process's metric objects, bound to one folder."""

    target: Target
    folder: Path
    webhook_deliveries: Counter
    upstream_requests: Counter
    upstream_duration: Histogram
    jobs_terminal: Counter
    job_duration: Histogram
    capacity_wait: Histogram


_lock = threading.Lock()
_target: Target | None = None
_current: Metrics | None = None
_bound_folder: Path | None = None  # the folder prometheus-client's storage writes to


def configure(folder: Path, providers: Iterable[str]) -> None:
    """Send this process's samples to ``folder`` (called by each entry point)."""
    global _target
    _target = Target(folder.resolve(), frozenset(providers))


def _prepare_folder(target: Target) -> Path:
    folder = target.folder
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


def _bind_storage(target: Target) -> Path:
    """Set MULTIPROC_ENV, then make prometheus-client store values in the folder."""
    global _bound_folder
    folder = _prepare_folder(target)
    from prometheus_client import values  # after MULTIPROC_ENV is set

    if _bound_folder != folder:
        # Our own storage whatever the library chose when imported (which may
        # have been before MULTIPROC_ENV was set): files named by process_id().
        if _bound_folder is not None:
            _close_files(values.ValueClass)
        values.ValueClass = values.MultiProcessValue(process_identifier=process_id)  # type: ignore[no-untyped-call]
        _bound_folder = folder
    return folder


def _create(target: Target) -> Metrics:
    folder = _bind_storage(target)
    from prometheus_client import Counter, Histogram

    # registry=None: samples go to the folder's files; /metrics reads them
    # through a MultiProcessCollector, never through a registry of this process.
    return Metrics(
        target=target,
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
        capacity_wait=Histogram(
            "variflow_capacity_wait_seconds",
            "From a job's creation to its admission on an account, for jobs that had to "
            "wait for capacity (a slot, a rate, a budget, a pause or a breaker).",
            ["provider"],
            buckets=CAPACITY_WAIT_BUCKETS,
            registry=None,
        ),
    )


def get_metrics() -> Metrics:
    """The metric objects for the configured folder, created on first use."""
    global _current
    target = _target
    if target is None:
        raise RuntimeError("metrics: no folder configured (metrics.configure)")
    current = _current
    if current is not None and current.target is target:
        return current
    with _lock:
        if _current is None or _current.target is not target:
            _current = _create(target)
        return _current


def reset_metrics() -> None:
    """Forget the metric objects and the storage binding, keeping the folder (tests)."""
    global _current, _bound_folder
    with _lock:
        _current = None
        if _bound_folder is not None:
            from prometheus_client import values

            _close_files(values.ValueClass)
            values.ValueClass = values.MutexValue
            _bound_folder = None
        os.environ.pop(MULTIPROC_ENV, None)


def _safely(what: str, record: Callable[[], None]) -> None:
    # A metric must never fail the work it describes (a full disk, a bad folder);
    # a process that configured no folder records nothing.
    if _target is None:
        return
    try:
        record()
    except Exception:
        log.warning("metrics: could not record %s", what, exc_info=True)


def _provider_label(provider: str) -> str:
    # Provider names can come from a URL: only known ones become label values.
    target = _target
    return provider if target is not None and provider in target.providers else "unknown"


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


def observe_capacity_wait(provider: str, seconds: float) -> None:
    """A job that waited for capacity was admitted after ``seconds`` (called by the
    submit flow once the admission is committed)."""
    _safely(
        "a capacity wait",
        lambda: (
            get_metrics().capacity_wait.labels(_provider_label(provider)).observe(max(0.0, seconds))
        ),
    )


def build_registry(collectors: Iterable[Any] = ()) -> CollectorRegistry:
    """A fresh registry: every process's samples from the folder, plus ``collectors``."""
    metrics = get_metrics()
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics.folder))  # type: ignore[no-untyped-call]
    for collector in collectors:
        registry.register(collector)
    return registry


def render_latest(collectors: Iterable[Any] = ()) -> bytes:
    """The Prometheus text exposition of everything (what GET /metrics answers)."""
    from prometheus_client import generate_latest

    return generate_latest(build_registry(collectors))


# -- process exits ------------------------------------------------------------


def mark_process_dead(pid: int) -> None:
    """Drop a dead process's live-gauge files (no-op for counters and histograms, kept)."""
    if _target is None:
        return
    folder = _prepare_folder(_target)
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(process_id(pid), str(folder))  # type: ignore[no-untyped-call]


def on_worker_process_shutdown(pid: int | None = None, **_: Any) -> None:
    """For Celery's worker_process_shutdown signal (connected by worker/celery_app.py)."""
    _safely("a process exit", lambda: mark_process_dead(pid or os.getpid()))
