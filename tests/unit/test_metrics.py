"""Metrics: outcome mapping, GET /metrics through the Flask test client, the job-stats
collector, the terminal hook, send()'s upstream metrics, the folder's scopes, a scope
served over HTTP and process-exit bookkeeping."""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Configure
from webhooks import MAX_BODY_BYTES, create_app
from webhooks.gunicorn_conf import child_exit
from webhooks.metrics import capacity_cache, webhook_outcome
from worker import job_stats, metrics
from worker.config import ConfigError, Settings
from worker.jobs import apply_update, lock_job
from worker.models import Job, utcnow
from worker.providers.base import TransientUpstreamError, send
from worker.runtime import session_scope
from worker.states import EventKind, EventRecord, JobStatus, Source, UpstreamState

SECRET = "s3cret"
HEADER = "x-webhook-secret"
URLS = ["https://cdn.piapi.test/1.png"]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(autouse=True)
def _fresh_metrics() -> Iterator[None]:
    metrics.reset_metrics()
    job_stats.job_stats_cache.clear()
    yield
    metrics.reset_metrics()
    job_stats.job_stats_cache.clear()


@pytest.fixture
def client(sqlite_url: str) -> FlaskClient:
    app = create_app()
    app.testing = True
    return app.test_client()


def scrape(client: FlaskClient) -> Samples:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def insert_job(**fields: Any) -> uuid.UUID:
    now = utcnow()
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "provider": "piapi",
        "status": "submitted",
        "params": {"origin_task_id": "o-1", "index": "1", "prompt": "a cat"},
        "upstream_task_id": f"t-{uuid.uuid4().hex[:8]}",
        "webhook_secret_hash": hashlib.sha256(SECRET.encode()).hexdigest(),
        "deadline": now + timedelta(hours=1),
        "created_at": now,
        "updated_at": now,
        "submitted_at": now,
        "next_poll_at": now + timedelta(minutes=2),
        "progress": 0,
    }
    values.update(fields)
    with session_scope() as session:
        session.add(Job(**values))
    job_id: uuid.UUID = values["id"]
    return job_id


def task_id_of(job_id: uuid.UUID) -> str:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.upstream_task_id is not None
        return job.upstream_task_id


def delivery(task_id: str, status: str, progress: int = 0) -> dict[str, Any]:
    output: dict[str, Any] = {"progress": progress}
    if status == "completed":
        output["image_urls"] = URLS
    return {
        "timestamp": 1_700_000_000,
        "data": {"task_id": task_id, "status": status, "output": output},
    }


def post(client: FlaskClient, job_id: object, payload: Any, secret: str = SECRET) -> int:
    answer = client.post(f"/webhooks/piapi/{job_id}", json=payload, headers={HEADER: secret})
    return answer.status_code


# --- outcome mapping ---------------------------------------------------------------------


def _event(
    kind: EventKind, from_: JobStatus, to: JobStatus, duplicate: bool = False
) -> EventRecord:
    return EventRecord(Source.WEBHOOK, kind, from_, to, duplicate=duplicate)


S, P, C, F = JobStatus.SUBMITTED, JobStatus.PROCESSING, JobStatus.COMPLETED, JobStatus.FAILED


@pytest.mark.parametrize(
    ("status_code", "event", "expected"),
    [
        (200, _event(EventKind.TRANSITION, S, P), "accepted"),
        (200, _event(EventKind.TRANSITION, P, C), "accepted"),
        (200, _event(EventKind.PROGRESS, P, P), "accepted"),
        (200, _event(EventKind.IGNORED, P, P, duplicate=True), "duplicate"),
        # A repeated final delivery: the transition function does not flag it.
        (200, _event(EventKind.IGNORED, C, C), "duplicate"),
        (200, _event(EventKind.IGNORED, P, S), "stale"),
        (200, _event(EventKind.IGNORED, C, F), "stale"),
        (200, None, "stale"),
        (400, None, "bad_request"),
        (401, None, "unauthorized"),
        (404, None, "not_found"),
        (409, None, "conflict"),
        (413, None, "too_large"),
        (500, None, "error"),
        (401, _event(EventKind.TRANSITION, S, P), "unauthorized"),  # the status code wins
    ],
)
def test_webhook_outcome(status_code: int, event: EventRecord | None, expected: str) -> None:
    assert webhook_outcome(status_code, event) == expected
    assert expected in metrics.WEBHOOK_OUTCOMES


@pytest.mark.parametrize(
    ("status_code", "transient", "expected"),
    [
        (200, False, "ok"),
        (204, False, "ok"),
        (302, False, "ok"),
        (400, False, "client_error"),
        (404, False, "client_error"),
        (429, True, "transient_error"),
        (503, True, "transient_error"),
        (501, False, "server_error"),
    ],
)
def test_upstream_outcome(status_code: int, transient: bool, expected: str) -> None:
    assert metrics.upstream_outcome(status_code, transient=transient) == expected
    assert expected in metrics.UPSTREAM_OUTCOMES


# --- webhook deliveries through the app --------------------------------------------------


def test_deliveries_are_counted_by_provider_and_outcome(client: FlaskClient) -> None:
    job = insert_job()
    task = task_id_of(job)
    assert post(client, job, delivery(task, "processing", 10)) == 200  # accepted
    assert post(client, job, delivery(task, "processing", 30)) == 200  # accepted (progress)
    assert post(client, job, delivery(task, "processing", 30)) == 200  # duplicate
    assert post(client, job, delivery(task, "submitted")) == 200  # stale
    assert post(client, job, delivery(task, "processing"), secret="wrong") == 401
    assert post(client, job, delivery(task, "processing"), secret="wrong") == 401
    assert post(client, job, {"no": "data"}) == 400
    assert post(client, uuid.uuid4(), delivery(task, "processing")) == 404
    assert post(client, job, delivery("someone-elses-task", "processing")) == 409
    too_big = client.post(
        f"/webhooks/piapi/{job}", data=b"x" * (MAX_BODY_BYTES + 1), headers={HEADER: SECRET}
    )
    assert too_big.status_code == 413
    assert post(client, job, delivery(task, "completed", 100)) == 200  # accepted
    assert post(client, job, delivery(task, "completed", 100)) == 200  # duplicate (terminal)
    # An unknown provider in the URL never becomes a label value of its own.
    assert client.post("/webhooks/no-such-provider/x", json={}).status_code == 404

    samples = scrape(client)
    name = "variflow_webhook_deliveries_total"
    expected = {
        "accepted": 3,
        "duplicate": 2,
        "stale": 1,
        "unauthorized": 2,
        "bad_request": 1,
        "not_found": 1,
        "conflict": 1,
        "too_large": 1,
    }
    for outcome, count in expected.items():
        assert value(samples, name, provider="piapi", outcome=outcome) == count, outcome
    assert value(samples, name, provider="unknown", outcome="not_found") == 1
    counted = sum(v for (n, _), v in samples.items() if n == name)
    assert counted == sum(expected.values()) + 1
    # Scraping is not a delivery.
    assert value(scrape(client), name, provider="piapi", outcome="accepted") == 3


# --- terminal jobs -----------------------------------------------------------------------


def _finish(job_id: uuid.UUID, state: UpstreamState, now: datetime) -> None:
    with session_scope() as session:
        job = lock_job(session, job_id)
        assert job is not None
        apply_update(session, job, state, now)


def test_terminal_jobs_are_counted_after_commit_with_their_duration(client: FlaskClient) -> None:
    now = utcnow()
    accepted = insert_job(
        created_at=now - timedelta(seconds=100), submitted_at=now - timedelta(seconds=42)
    )
    _finish(accepted, UpstreamState(C, Source.POLL, image_urls=tuple(URLS)), now)
    never_sent = insert_job(
        status="queued",
        upstream_task_id=None,
        submitted_at=None,
        created_at=now - timedelta(seconds=7),
    )
    _finish(never_sent, UpstreamState(F, Source.SWEEP, error_code="timeout"), now)

    rolled_back = insert_job()
    with pytest.raises(RuntimeError), session_scope() as session:
        job = lock_job(session, rolled_back)
        assert job is not None
        apply_update(session, job, UpstreamState(F, Source.POLL), now)
        raise RuntimeError("the transaction does not commit")

    samples = scrape(client)
    assert value(samples, "variflow_jobs_terminal_total", provider="piapi", status="completed") == 1
    assert value(samples, "variflow_jobs_terminal_total", provider="piapi", status="failed") == 1
    duration = "variflow_job_duration_seconds"
    completed = {"provider": "piapi", "status": "completed"}
    assert value(samples, f"{duration}_sum", **completed) == pytest.approx(42)  # from submitted_at
    assert value(samples, f"{duration}_count", **completed) == 1
    assert value(samples, f"{duration}_bucket", le="30.0", **completed) == 0
    assert value(samples, f"{duration}_bucket", le="60.0", **completed) == 1
    failed = {"provider": "piapi", "status": "failed"}
    assert value(samples, f"{duration}_sum", **failed) == pytest.approx(7)  # from created_at


# --- jobs by status and polling lag (scrape time) ----------------------------------------


def test_job_stats_collector(client: FlaskClient) -> None:
    now = utcnow()
    insert_job(status="queued", upstream_task_id=None, next_poll_at=None)
    insert_job(status="queued", upstream_task_id=None, next_poll_at=None)
    insert_job(status="submitted", next_poll_at=now - timedelta(seconds=90))  # due longest
    insert_job(status="processing", next_poll_at=now - timedelta(seconds=30))
    insert_job(status="processing", next_poll_at=now + timedelta(seconds=60))
    insert_job(status="completed", next_poll_at=None, completed_at=now)
    # A terminal job's leftover next_poll_at is not polling lag.
    insert_job(status="failed", next_poll_at=now - timedelta(hours=5), completed_at=now)

    samples = scrape(client)
    jobs = {
        status.value: value(samples, "variflow_jobs", status=status.value) for status in JobStatus
    }
    assert jobs == {
        "queued": 2,
        "submitted": 1,
        "processing": 2,
        "completed": 1,
        "failed": 1,
        "cancelled": 0,
    }
    assert ("variflow_jobs", frozenset({("status", "cancelled")})) in samples  # explicit zero
    lag = value(samples, "variflow_polling_lag_seconds")
    elapsed = (utcnow() - now).total_seconds()
    assert 90 <= lag <= 90 + elapsed


def test_polling_lag_is_zero_when_nothing_is_due(client: FlaskClient) -> None:
    insert_job(status="submitted", next_poll_at=utcnow() + timedelta(seconds=30))
    samples = scrape(client)
    assert value(samples, "variflow_polling_lag_seconds") == 0
    assert ("variflow_polling_lag_seconds", frozenset()) in samples


def test_job_stats_are_cached_for_the_ttl(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(job_stats.job_stats_cache, "clock", lambda: clock[0])
    insert_job(status="queued", upstream_task_id=None)
    assert value(scrape(client), "variflow_jobs", status="queued") == 1
    insert_job(status="queued", upstream_task_id=None)
    clock[0] += job_stats.STATS_TTL - 0.1
    assert value(scrape(client), "variflow_jobs", status="queued") == 1  # cached
    clock[0] += 0.2
    assert value(scrape(client), "variflow_jobs", status="queued") == 2  # refreshed


def test_database_trouble_drops_the_job_gauges_not_the_scrape(
    tmp_path: Path, configure: Configure
) -> None:
    configure(database_url=f"sqlite:///{tmp_path / 'not-migrated.db'}")
    app = create_app()
    app.testing = True
    client = app.test_client()
    metrics.count_webhook("piapi", "accepted")
    samples = scrape(client)
    assert (
        value(samples, "variflow_webhook_deliveries_total", provider="piapi", outcome="accepted")
        == 1
    )
    assert not [name for name, _ in samples if name.startswith("variflow_jobs")]


# --- upstream requests (providers/base.py: send) -----------------------------------------


def test_send_counts_every_upstream_request(client: FlaskClient) -> None:
    answers: dict[str, Callable[[httpx.Request], httpx.Response]] = {
        "/ok": lambda r: httpx.Response(200, json={}),
        "/busy": lambda r: httpx.Response(503),
        "/gone": lambda r: httpx.Response(404, json={}),
        "/nope": lambda r: httpx.Response(501),
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/down":
            raise httpx.ConnectError("refused", request=request)
        if request.url.path == "/slow":
            raise httpx.ReadTimeout("slow", request=request)
        return answers[request.url.path](request)

    http = httpx.Client(transport=httpx.MockTransport(handler), base_url="https://up.test")
    assert send(http, "piapi", "GET", "/ok", operation="poll").status_code == 200
    assert send(http, "piapi", "GET", "/ok", operation="poll").status_code == 200
    assert send(http, "piapi", "GET", "/gone", operation="poll").status_code == 404
    assert send(http, "piapi", "GET", "/nope", operation="poll").status_code == 501
    for path in ("/busy", "/down", "/slow"):
        with pytest.raises(TransientUpstreamError):
            send(http, "piapi", "POST", path, operation="create")
    assert send(http, "piclaza", "POST", "/ok", operation="create").status_code == 200

    samples = scrape(client)
    requests = "variflow_upstream_requests_total"
    assert value(samples, requests, provider="piapi", operation="poll", outcome="ok") == 2
    assert value(samples, requests, provider="piapi", operation="poll", outcome="client_error") == 1
    assert value(samples, requests, provider="piapi", operation="poll", outcome="server_error") == 1
    assert (
        value(samples, requests, provider="piapi", operation="create", outcome="transient_error")
        == 1
    )
    assert (
        value(samples, requests, provider="piapi", operation="create", outcome="transport_error")
        == 2
    )
    assert value(samples, requests, provider="piclaza", operation="create", outcome="ok") == 1
    latency = "variflow_upstream_request_duration_seconds_count"
    assert value(samples, latency, provider="piapi", operation="poll") == 4
    assert value(samples, latency, provider="piapi", operation="create") == 3
    assert value(samples, latency, provider="piclaza", operation="create") == 1


def test_a_broken_metrics_folder_never_fails_the_call(
    tmp_path: Path, configure: Configure, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    configure(metrics_dir=blocker / "metrics")
    http = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    assert send(http, "piapi", "GET", "https://up.test/x", operation="poll").status_code == 200
    assert "metrics: could not record an upstream request" in caplog.text


# --- the folder, its scopes and process exits --------------------------------------------


def test_samples_go_to_the_configured_folder_and_follow_the_settings(
    tmp_path: Path, configure: Configure
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    configure(metrics_dir=first)
    metrics.count_webhook("piapi", "accepted")
    assert os.environ[metrics.MULTIPROC_ENV] == str(first / "web")
    assert (first / "web" / f"counter_{metrics.process_id()}.db").exists()

    configure(metrics_dir=second)  # e.g. the next test: nothing carries over
    metrics.count_webhook("piapi", "stale")
    assert os.environ[metrics.MULTIPROC_ENV] == str(second / "web")
    text = metrics.render_latest().decode()
    assert 'outcome="stale"' in text
    assert 'outcome="accepted"' not in text


def test_default_folder_is_the_web_scope_under_home(tmp_path: Path) -> None:
    metrics.count_webhook("piapi", "accepted")
    assert metrics.get_metrics().folder == (tmp_path / "home" / "metrics" / "web").resolve()
    assert list((tmp_path / "home" / "metrics" / "web").glob("counter_*.db"))


@pytest.mark.parametrize(
    ("node", "scope"),
    [
        ("celery@host-1", "worker/celery@host-1"),
        ("w2@a.example.com", "worker/w2@a.example.com"),
        ("../../etc", "worker/-..-etc"),  # a node name never leaves the metrics folder
        ("..", "worker/celery"),
        ("", "worker/celery"),
    ],
)
def test_worker_scope_is_a_subfolder_named_by_the_node(node: str, scope: str) -> None:
    assert metrics.worker_scope(node) == scope


def _counter_file(folder: Path, pid: int, name: str = "variflow_old") -> Path:
    """A counter file a process ``pid`` of an earlier run left (value 5)."""
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"counter_{metrics.process_id(pid)}.db"
    file = MmapedDict(str(path))
    file.write_value(mmap_key(name, f"{name}_total", [], [], "old"), 5.0, 0.0)
    file.close()
    return path


def test_a_main_process_starts_its_scope_empty_and_leaves_the_others(
    tmp_path: Path, configure: Configure
) -> None:
    """A restarted worker: dead pids of its earlier run are not summed again."""
    base = tmp_path / "m"
    configure(metrics_dir=base)
    scope = metrics.worker_scope("celery@h")
    stale = _counter_file(base / scope, 4242)
    other_worker = _counter_file(base / metrics.worker_scope("w2@h"), 4343)
    web = _counter_file(base / "web", 4444)

    folder = metrics.start_scope(base, scope, ["piapi"])
    assert folder == (base / "worker" / "celery@h").resolve()
    assert not stale.exists()
    assert other_worker.exists() and web.exists()
    metrics.count_webhook("piapi", "accepted")
    assert (folder / f"counter_{metrics.process_id()}.db").exists()
    text = metrics.render_latest().decode()
    assert "variflow_old" not in text
    assert 'variflow_webhook_deliveries_total{outcome="accepted",provider="piapi"} 1.0' in text

    # Started again while this process had its files open: it records into new ones.
    metrics.start_scope(base, scope, ["piapi"])
    metrics.count_webhook("piapi", "accepted")
    assert 'outcome="accepted",provider="piapi"} 1.0' in metrics.render_latest().decode()


def test_a_served_scope_answers_its_own_samples_and_no_database_gauges(
    client: FlaskClient, tmp_path: Path
) -> None:
    """What a worker's main process serves (worker/celery_app.py): its scope, over HTTP."""
    insert_job(status="queued", upstream_task_id=None)
    base = tmp_path / "m"
    _counter_file(base / "web", 4444)  # the web app's samples on the same host
    metrics.start_scope(base, metrics.worker_scope("celery@h"), ["piapi"])
    metrics.observe_upstream("piapi", "create", "ok", 0.3)
    host, port = metrics.serve("127.0.0.1", 0)
    answer = httpx.get(f"http://{host}:{port}/metrics", timeout=5)
    assert answer.status_code == 200
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }
    requests = "variflow_upstream_requests_total"
    assert value(samples, requests, provider="piapi", operation="create", outcome="ok") == 1
    assert not [name for name, _ in samples if name.startswith(("variflow_jobs", "variflow_old"))]
    assert not [name for name, _ in samples if name.startswith("variflow_account_")]


def test_serving_on_a_port_in_use_fails(tmp_path: Path) -> None:
    metrics.start_scope(tmp_path / "m", metrics.worker_scope("celery@h"), ["piapi"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            metrics.serve("127.0.0.1", taken.getsockname()[1])


@pytest.mark.parametrize("port", ["-1", "65536", "nine"])
def test_a_bad_worker_metrics_port_names_the_variable(configure: Configure, port: str) -> None:
    with pytest.raises(ConfigError, match="VARIFLOW_WORKER_METRICS_PORT"):
        configure(worker_metrics_port=port)


def _live_gauge_file(folder: Path, pid: int) -> Path:
    """The file a "livesum" gauge of process ``pid`` would leave (variflow has none yet)."""
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    path = folder / f"gauge_livesum_{metrics.process_id(pid)}.db"
    file = MmapedDict(str(path))
    file.write_value(mmap_key("live", "live", [], [], "a live gauge"), 1.0, 0.0)
    file.close()
    return path


def test_gunicorn_child_exit_marks_the_worker_dead(tmp_path: Path, configure: Configure) -> None:
    configure(metrics_dir=tmp_path / "m")
    metrics.get_metrics()
    dead = _live_gauge_file(tmp_path / "m" / "web", 4242)
    alive = _live_gauge_file(tmp_path / "m" / "web", 4343)
    child_exit(None, SimpleNamespace(pid=4242))
    assert not dead.exists()
    assert alive.exists()


def test_celery_process_shutdown_marks_the_child_dead(tmp_path: Path, configure: Configure) -> None:
    from celery.signals import worker_process_shutdown

    configure(metrics_dir=tmp_path / "m")
    folder = metrics.start_scope(tmp_path / "m", metrics.worker_scope("celery@h"), ["piapi"])
    dead = _live_gauge_file(folder, 5151)
    worker_process_shutdown.send(sender=None, pid=5151, exitcode=0)
    assert not dead.exists()


# --- capacity ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("waiting for a slot: 3/3 in flight on piapi/main", "slot"),
        ("waiting for a slot: 4 earlier jobs of piapi go first", "slot"),
        ("rate limit of 10 creates a minute on lemondata/main", "rate"),
        ("daily budget of 30 failed tasks reached on piapi/a: resumes 00:00 UTC", "budget"),
        ("daily spend cap of 5 reached on piapi/a: resumes 00:00 UTC", "budget"),
        ("paused until 12:00:00 UTC on piapi/a: 429", "paused"),
        ("circuit open until 12:00:00 UTC on piapi/a (5 failures in a row)", "breaker"),
        ("circuit half open on piapi/a: one probe job decides", "breaker"),
        ("paused until 12:00:00 UTC on piapi/a: 429; waiting for a slot: 1/1", "paused"),
        ("something new", "other"),
        ("", "other"),
        (None, "other"),
    ],
)
def test_wait_reason_kind(reason: str | None, kind: str) -> None:
    assert job_stats.wait_reason_kind(reason) == kind
    assert kind in job_stats.WAIT_REASONS


def test_capacity_waits_are_observed_by_provider(client: FlaskClient) -> None:
    metrics.observe_capacity_wait("piapi", 42.0)
    metrics.observe_capacity_wait("piapi", 7200.0)
    metrics.observe_capacity_wait("piapi", -1.0)  # a clock step back is no negative wait
    metrics.observe_capacity_wait("no-such-provider", 1.0)

    samples = scrape(client)
    name = "variflow_capacity_wait_seconds"
    assert value(samples, f"{name}_count", provider="piapi") == 3
    assert value(samples, f"{name}_sum", provider="piapi") == pytest.approx(7242.0)
    assert value(samples, f"{name}_bucket", provider="piapi", le="60.0") == 2
    assert value(samples, f"{name}_bucket", provider="piapi", le="86400.0") == 3
    assert value(samples, f"{name}_count", provider="unknown") == 1


def test_capacity_gauges_of_the_default_accounts(client: FlaskClient) -> None:
    insert_job(status="processing", account="main")
    insert_job(status="queued", upstream_task_id=None, waiting_reason="waiting for a slot: 1/1")
    samples = scrape(client)
    for provider in ("piapi", "piclaza", "lemondata"):
        labels = {"provider": provider, "account": "main"}
        assert ("variflow_account_in_flight", frozenset(labels.items())) in samples
        assert value(samples, "variflow_account_breaker_open", **labels) == 0
        assert value(samples, "variflow_account_paused", **labels) == 0
        # No limit: no slots series (0 would read as "no slot at all").
        assert ("variflow_account_slots", frozenset(labels.items())) not in samples
    assert value(samples, "variflow_account_in_flight", provider="piapi", account="main") == 1
    assert value(samples, "variflow_jobs_waiting", provider="piapi", reason="slot") == 1
    assert ("variflow_jobs_waiting", frozenset({("provider", "piclaza"), ("reason", "other")})) in (
        samples
    )


def test_capacity_gauges_are_cached_for_the_ttl(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(capacity_cache, "clock", lambda: clock[0])
    capacity_cache.clear()
    try:
        insert_job(status="processing", account="main")
        gauge = "variflow_account_in_flight"
        assert value(scrape(client), gauge, provider="piapi", account="main") == 1
        insert_job(status="processing", account="main")
        clock[0] += job_stats.STATS_TTL - 0.1
        assert value(scrape(client), gauge, provider="piapi", account="main") == 1  # cached
        clock[0] += 0.2
        assert value(scrape(client), gauge, provider="piapi", account="main") == 2
    finally:
        capacity_cache.clear()


def test_database_trouble_drops_the_capacity_gauges_not_the_scrape(
    tmp_path: Path, configure: Configure
) -> None:
    configure(database_url=f"sqlite:///{tmp_path / 'not-migrated.db'}")
    app = create_app()
    app.testing = True
    metrics.count_webhook("piapi", "accepted")
    samples = scrape(app.test_client())
    assert value(samples, "variflow_webhook_deliveries_total", provider="piapi", outcome="accepted")
    assert not [name for name, _ in samples if name.startswith("variflow_account_")]


# --- docs/prometheus.yml -----------------------------------------------------------------


def test_the_prometheus_example_scrapes_the_web_app_and_every_worker_where_they_serve() -> None:
    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "docs" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"variflow-web", "variflow-worker"}
    worker_port = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]["worker"][
        "expose"
    ]
    for job in jobs.values():
        assert job["metrics_path"] == "/metrics"
    [web] = jobs["variflow-web"]["static_configs"][0]["targets"]
    assert web.endswith(f":{Settings.model_fields['port'].default}")
    workers = jobs["variflow-worker"]["static_configs"][0]["targets"]
    assert len(workers) >= 2
    assert all(target.rsplit(":", 1)[1] in worker_port for target in workers)
