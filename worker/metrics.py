"""Prometheus metrics: the counters variflow keeps, kept on each host and served by it.

Celery runs prefork children and gunicorn several workers, so each process
writes its samples to its own files in a folder (prometheus-client's
multiprocess mode) and a scrape adds up the files of one *scope*: the processes
one main process started. The scopes of a host are subfolders of
``VARIFLOW_METRICS_DIR`` (default ``$VARIFLOW_HOME/metrics``), a folder no other
host needs to see:

- ``web/``: gunicorn's master and its workers; the web app's ``GET /metrics``
  serves them (webhooks/metrics.py), with the gauges read from the database.
  Any process that is not a Celery worker (the CLI, an application using
  worker.api) records here too, so the web app on its host counts it.
- ``worker/<node name>/``: one Celery worker (``celery@host`` by default) and
  its pool children; the worker's main process serves them on
  ``VARIFLOW_WORKER_METRICS_PORT`` (:func:`serve`), never the database gauges,
  so that a fleet of workers does not multiply them.

So a web app and a worker on one box never count each other's samples. A main
process empties its scope's folder when it starts (:func:`start_scope`): a
restarted web app or worker starts its counters from zero, which Prometheus
reads as a counter reset (``rate()`` and ``increase()`` handle it), and files of
processes from earlier runs are never summed again. While it runs, the counters
of its children that exited stay in the sums (counters never go backwards);
their live gauges are dropped (:func:`mark_process_dead`).

Each process's entry point calls :func:`configure` with the base folder; until
then, recording is a no-op. prometheus-client picks its storage when
``prometheus_client.values`` is imported, from ``PROMETHEUS_MULTIPROC_DIR``, so
nothing here touches the library until the first sample: :func:`get_metrics`
then sets the variable, imports the library and installs its own storage in the
scope's folder — even if something imported the library earlier, or for
another folder (tests switch folders per test) — with files named by host and
pid, in case the folder is a volume that containers with their own pids share.

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


# The scope of the web app's processes, and of every process that is not a Celery worker.
WEB_SCOPE = "web"

_lock = threading.Lock()
_scope = WEB_SCOPE  # this process's: set by its main process, inherited by forked children
_target: Target | None = None
_current: Metrics | None = None
_bound_folder: Path | None = None  # the folder prometheus-client's storage writes to
_servers: list[Any] = []  # the HTTP servers of this process's samples (serve)
_fork_hook = False  # _forget_servers_in_child is registered


def configure(folder: Path, providers: Iterable[str]) -> None:
    """Send this process's samples to its scope's subfolder of ``folder`` (the base
    folder, VARIFLOW_METRICS_DIR; called by each entry point)."""
    global _target
    _target = Target(folder.resolve() / _scope, frozenset(providers))


def worker_scope(node_name: str) -> str:
    """The scope of one Celery worker and its pool: ``worker/<node name>``.

    Celery wants node names unique on a host (``-n worker2@%h``), so two workers
    sharing a VARIFLOW_HOME never empty or sum each other's files.
    """
    safe = re.sub(r"[^A-Za-z0-9@._-]", "-", node_name).strip(".")
    return f"worker/{safe or 'celery'}"


def start_scope(folder: Path, scope: str, providers: Iterable[str]) -> Path:
    """A main process starts (gunicorn's master, a Celery worker's main process): it and
    the children it forks record in ``folder/scope``, emptied of the files of earlier
    runs (dead pids must not be summed forever). Returns the scope's folder."""
    global _scope
    with _lock:
        _scope = scope
        configure(folder, providers)
        assert _target is not None
        path = _target.folder
        if _bound_folder == path:
            _unbind()  # its files are about to go: reopen them on the next sample
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)
    return path


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


def _unbind() -> None:
    # Back to the library's in-memory values; the next sample binds the storage again.
    global _current, _bound_folder
    _current = None
    if _bound_folder is not None:
        from prometheus_client import values

        _close_files(values.ValueClass)
        values.ValueClass = values.MutexValue
        _bound_folder = None


def reset_metrics() -> None:
    """Forget the metric objects, the storage binding, the scope and the servers,
    keeping the folder (tests)."""
    global _scope
    stop_serving()
    with _lock:
        _unbind()
        _scope = WEB_SCOPE
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


# -- a worker's own endpoint ----------------------------------------------------


def serve(host: str, port: int) -> tuple[str, int]:
    """Serve the samples of this process's scope over HTTP on a daemon thread (a Celery
    worker's main process, before it forks its pool); returns the bound address.

    prometheus-client's own server: it answers every path (``/metrics`` is the one
    documented) and logs no request. Raises OSError when it cannot listen (a port in
    use, an address not of this host).
    """
    global _fork_hook
    from prometheus_client import start_http_server

    registry = build_registry()
    server, _ = start_http_server(port, addr=host, registry=registry)
    with _lock:
        if not _fork_hook:
            os.register_at_fork(after_in_child=_forget_servers_in_child)
            _fork_hook = True
        _servers.append(server)
    address = server.server_address
    return str(address[0]), int(address[1])


def _forget_servers_in_child() -> None:
    # A forked pool process must not keep its parent's listening socket open: after the
    # parent died, an orphan child finishing its task would keep the port from a new
    # worker. The child runs no server thread; closing its copy leaves the parent's.
    for server in _servers:
        server.socket.close()
    _servers.clear()


def stop_serving() -> None:
    """Stop this process's servers (tests; a worker's daemon thread ends with it)."""
    with _lock:
        servers = list(_servers)
        _servers.clear()
    for server in servers:
        server.shutdown()
        server.server_close()


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
