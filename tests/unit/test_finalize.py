"""After a job ends (worker/finalize.py): archiving result images and the signed notification,
over real HTTP against a small local server, on the embedded SQLite."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook, WebhookVerificationError

from worker.api import get_job
from worker.config import ConfigError, Settings, load_settings
from worker.finalize import (
    NotifyFailed,
    archive,
    archive_results,
    final_state,
    notification_id,
    notify,
    post_notification,
)
from worker.jobs import apply_update, lock_job
from worker.models import Job, utcnow
from worker.runtime import current, session_scope
from worker.states import JobStatus, Source, UpstreamState
from worker.tasks import finalize_job

Configure = Callable[..., Settings]

SECRET = "whsec_" + base64.b64encode(b"variflow-test-notify-secret-32by").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"somebody-else-s-secret-32-bytes!").decode()


def png(size: int = 16, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (40, 40, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


# --- a tiny HTTP server -----------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    hold: threading.Event | None = None  # answer only once this is set (or after 10 s)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Server:
    """Answers each path with its replies in turn (the last one repeats); records requests."""

    def __init__(self) -> None:
        self.routes: dict[str, list[Reply]] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                reply = owner._next(
                    Request(self.command, self.path, dict(self.headers.items()), body)
                )
                if reply.hold is not None:
                    reply.hold.wait(10)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_POST = _serve

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"

    def route(self, path: str, *replies: Reply) -> str:
        self.routes[path] = list(replies)
        return self.url + path

    def _next(self, request: Request) -> Reply:
        with self._lock:
            self.requests.append(request)
            replies = self.routes.get(request.path.split("?")[0])
            if not replies:
                return Reply(404, b"not found")
            return replies.pop(0) if len(replies) > 1 else replies[0]

    def hits(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path.split("?")[0] == path]


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.httpd.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def settings(sqlite_url: str, configure: Configure, tmp_path: Path) -> Settings:
    return configure(
        public_url="https://variflow.example.test",
        result_store=str(tmp_path / "store"),
        allow_private_urls=True,  # the test server is on loopback
        archive_max_bytes=4096,
        notify_secret=SECRET,
        notify_timeout=2,
    )


@pytest.fixture
def client(settings: Settings) -> httpx.Client:
    return current().http  # the worker's own client, as finalize_job uses it


def insert_job(status: str = "completed", **fields: Any) -> uuid.UUID:
    """A job row as it is after its end (no hooks run: nothing else finalizes it)."""
    now = utcnow()
    job_id = uuid.uuid4()
    values: dict[str, Any] = {
        "id": job_id,
        "provider": "piapi",
        "status": status,
        "params": {"origin_task_id": "o-1", "index": "1", "prompt": "a cat"},
        "upstream_task_id": f"t-{job_id.hex[:8]}",
        "deadline": now + timedelta(hours=1),
        "created_at": now - timedelta(seconds=30),
        "updated_at": now,
        "submitted_at": now - timedelta(seconds=29),
        "completed_at": now,
        "progress": 100 if status == "completed" else 40,
    }
    values.update(fields)
    with session_scope() as session:
        session.add(Job(**values))
    return values["id"]


def load(job_id: uuid.UUID) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def finalize_events(job_id: uuid.UUID) -> list[str]:
    return [e.message or "" for e in get_job(job_id).events if e.source == "finalize"]


# --- the secret -------------------------------------------------------------------------


def test_a_whsec_secret_is_accepted(configure: Configure) -> None:
    settings = configure(notify_secret=SECRET)
    assert settings.notify_secret is not None
    assert settings.notify_secret.get_secret_value() == SECRET


@pytest.mark.parametrize(
    "secret",
    ["abcde", "whsec_", "whsec_a", "whsec_!!!!", "whsec_abcde"],
    ids=["not-base64", "empty", "one-char", "no-base64-chars", "bad-padding"],
)
def test_a_secret_standard_webhooks_cannot_use_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    # Each of these makes Webhook(secret) raise; accepted, every notification would crash.
    with pytest.raises((ValueError, EmptyWebhookSecretError)):
        Webhook(secret).sign("msg_1", datetime.now(UTC), "{}")
    monkeypatch.setenv("VARIFLOW_NOTIFY_SECRET", secret)

    with pytest.raises(ConfigError, match="VARIFLOW_NOTIFY_SECRET"):
        load_settings()


def test_a_secret_without_the_whsec_prefix_stops_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VARIFLOW_NOTIFY_SECRET", "hunter2-my-password")

    with pytest.raises(ConfigError, match="VARIFLOW_NOTIFY_SECRET"):
        load_settings()


# --- post_notification ------------------------------------------------------------------


def test_post_notification_is_signed_per_standard_webhooks(
    server: Server, settings: Settings, client: httpx.Client
) -> None:
    url = server.route("/hooks/variflow", Reply(204))
    body = {"type": "job.completed", "data": {"id": "j-1", "result_urls": ["https://x/1.png"]}}
    before = int(time.time())

    status = post_notification(url, body, "msg_abc", settings, client)

    assert status == 204
    [request] = server.hits("/hooks/variflow")
    assert request.method == "POST"
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert headers["webhook-id"] == "msg_abc"
    assert before <= int(headers["webhook-timestamp"]) <= int(time.time())
    assert headers["webhook-signature"].startswith("v1,")
    assert headers["content-type"] == "application/json"
    assert Webhook(SECRET).verify(request.body, request.headers) == body
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER_SECRET).verify(request.body, request.headers)
    tampered = request.body.replace(b"j-1", b"j-2")
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tampered, request.headers)


@pytest.mark.parametrize("code", [301, 302, 400, 401, 404, 410, 429, 500, 503])
def test_post_notification_raises_on_a_non_2xx_answer(
    server: Server, settings: Settings, client: httpx.Client, code: int
) -> None:
    url = server.route("/hook", Reply(code, headers={"Location": server.url + "/elsewhere"}))

    with pytest.raises(NotifyFailed, match=f"HTTP {code}"):
        post_notification(url, {"type": "job.failed"}, "msg_1", settings, client)
    assert server.hits("/elsewhere") == []  # a redirect is not followed


def test_post_notification_raises_when_nobody_listens(
    settings: Settings, client: httpx.Client
) -> None:
    with pytest.raises(NotifyFailed, match="ConnectError"):
        post_notification("http://127.0.0.1:9/hook", {}, "msg_1", settings, client)


def test_post_notification_raises_on_a_slow_endpoint(
    server: Server, configure: Configure, sqlite_url: str
) -> None:
    # The endpoint is on 127.0.0.1: allowed here, as the other tests of this file do.
    settings = configure(notify_secret=SECRET, notify_timeout=0.3, allow_private_urls=True)
    release = threading.Event()
    url = server.route("/slow", Reply(200, hold=release))
    try:
        with pytest.raises(NotifyFailed, match="Timeout"):
            post_notification(url, {}, "msg_1", settings, current().http)
    finally:
        release.set()


# --- archive_results --------------------------------------------------------------------


def job_with(urls: list[str], job_id: uuid.UUID | None = None) -> Job:
    return Job(id=job_id or uuid.uuid4(), provider="piapi", status="completed", result_urls=urls)


def test_archive_results_downloads_into_the_result_store(
    server: Server, settings: Settings, client: httpx.Client
) -> None:
    first, second = png(), jpeg()
    urls = [
        server.route("/cdn/a.png", Reply(200, first, {"Content-Type": "image/png"})),
        server.route("/cdn/b", Reply(200, second, {"Content-Type": "image/jpeg; charset=x"})),
    ]
    job = job_with(urls)

    archived = archive_results(job, settings, client)

    base = f"https://variflow.example.test/results/{job.id}"
    assert archived.errors == []
    assert archived.urls == [f"{base}/1.png", f"{base}/2.jpg"]
    folder = settings.results_folder / str(job.id)
    assert folder.parent == (settings.results_folder)
    assert settings.results_folder == Path(settings.result_store).resolve()
    assert (folder / "1.png").read_bytes() == first
    assert (folder / "2.jpg").read_bytes() == second
    assert sorted(p.name for p in folder.iterdir()) == ["1.png", "2.jpg"]  # no temp files


def test_archive_results_keeps_an_image_over_the_size_cap_out(
    server: Server, settings: Settings, client: httpx.Client
) -> None:
    small = png()
    big = png(512) + os.urandom(settings.archive_max_bytes)  # over the cap whatever PNG gives
    assert len(small) < settings.archive_max_bytes < len(big)
    job = job_with(
        [
            server.route("/big.png", Reply(200, big, {"Content-Type": "image/png"})),
            server.route("/small.png", Reply(200, small, {"Content-Type": "image/png"})),
        ]
    )

    archived = archive_results(job, settings, client)

    assert archived.urls == [f"https://variflow.example.test/results/{job.id}/2.png"]
    [error] = archived.errors
    assert error.startswith(server.url + "/big.png: ")
    assert f"over the limit of {settings.archive_max_bytes} bytes" in error
    folder = settings.results_folder / str(job.id)
    assert sorted(p.name for p in folder.iterdir()) == ["2.png"]  # nothing of the big one


def test_archive_results_refuses_redirects(
    server: Server, settings: Settings, client: httpx.Client
) -> None:
    target = server.route("/internal/secret.png", Reply(200, png(), {"Content-Type": "image/png"}))
    for code in (301, 302, 307, 308):
        server.route(f"/moved-{code}", Reply(code, headers={"Location": target}))
    job = job_with([f"{server.url}/moved-{code}" for code in (301, 302, 307, 308)])

    archived = archive_results(job, settings, client)

    assert archived.urls == []
    assert [e.split(": ", 1)[1] for e in archived.errors] == [
        "HTTP 301",
        "HTTP 302",
        "HTTP 307",
        "HTTP 308",
    ]
    assert server.hits("/internal/secret.png") == []
    assert not (settings.results_folder / str(job.id)).exists()


def test_archive_results_keeps_its_own_result_urls_as_they_are(
    server: Server, configure: Configure, sqlite_url: str, tmp_path: Path
) -> None:
    # The public URL is the test server: a download of an own URL would show up there.
    settings = configure(
        public_url=server.url, result_store=str(tmp_path / "store"), allow_private_urls=True
    )
    job_id = uuid.uuid4()
    own = [f"{server.url}/results/{job_id}/1.png", f"{server.url}/results/{job_id}/2.png"]
    remote = server.route("/cdn/3.png", Reply(200, png(), {"Content-Type": "image/png"}))
    job = job_with([*own, remote], job_id)

    archived = archive_results(job, settings, current().http)

    assert archived.errors == []
    assert archived.urls == [*own, f"{server.url}/results/{job_id}/3.png"]
    assert [r.path for r in server.requests] == ["/cdn/3.png"]


def test_archive_results_records_what_it_cannot_fetch(
    server: Server, settings: Settings, client: httpx.Client
) -> None:
    good = server.route("/ok.png", Reply(200, png(), {"Content-Type": "image/png"}))
    job = job_with(
        [
            server.url + "/gone.png",
            "ftp://cdn.example.test/1.png",
            "http://127.0.0.1:9/refused.png",
            server.route("/error.png", Reply(500, b"oops")),
            good,
        ]
    )

    archived = archive_results(job, settings, client)

    assert archived.urls == [f"https://variflow.example.test/results/{job.id}/5.png"]
    assert len(archived.errors) == 4
    assert "HTTP 404" in archived.errors[0]
    assert "not an http(s) URL" in archived.errors[1]
    assert archived.errors[2].startswith("http://127.0.0.1:9/refused.png: ")
    assert "HTTP 500" in archived.errors[3]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "169.254.169.254"])
def test_archive_results_refuses_private_hosts_by_default(
    server: Server, configure: Configure, settings: Settings, host: str
) -> None:
    settings = configure(allow_private_urls=False)
    server.route("/a.png", Reply(200, png(), {"Content-Type": "image/png"}))
    port = server.url.rsplit(":", 1)[1]
    job = job_with([f"http://{host}:{port}/a.png"])

    archived = archive_results(job, settings, current().http)

    assert archived.urls == []
    [error] = archived.errors
    assert "non-public address" in error
    assert "VARIFLOW_ALLOW_PRIVATE_URLS" in error
    assert server.requests == []


# --- archive (the step finalize_job runs) -----------------------------------------------


def test_archive_stores_the_urls_and_records_an_event(
    server: Server, settings: Settings, client: httpx.Client
) -> None:
    big = os.urandom(settings.archive_max_bytes + 1)
    urls = [
        server.route("/a.png", Reply(200, png(), {"Content-Type": "image/png"})),
        server.route("/big.png", Reply(200, big, {"Content-Type": "image/png"})),
    ]
    job_id = insert_job(result_urls=urls)

    archive(job_id, settings, client, current().db)  # an image over the cap is recorded, not raised

    job = load(job_id)
    assert job.archived_urls == [f"https://variflow.example.test/results/{job_id}/1.png"]
    assert job.result_urls == urls  # the provider's URLs stay
    assert job.status == "completed"
    [message] = finalize_events(job_id)
    assert message.startswith("archived 1 of 2 result image(s); failed: ")
    assert "/big.png: over the limit" in message

    archive(job_id, settings, client, current().db)  # once archived, never again

    assert len(server.hits("/a.png")) == 1
    assert len(finalize_events(job_id)) == 1


def test_archive_does_nothing_when_the_result_store_is_off(
    server: Server, configure: Configure, settings: Settings, client: httpx.Client
) -> None:
    settings = configure(result_store="off")
    assert not settings.archive_results
    job_id = insert_job(result_urls=[server.route("/a.png", Reply(200, png()))])

    archive(job_id, settings, client, current().db)

    assert server.requests == []
    assert load(job_id).archived_urls is None
    assert finalize_events(job_id) == []


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_archive_skips_a_job_that_did_not_complete(
    server: Server, settings: Settings, client: httpx.Client, status: str
) -> None:
    job_id = insert_job(status, result_urls=[server.route("/a.png", Reply(200, png()))])

    archive(job_id, settings, client, current().db)

    assert server.requests == []
    assert load(job_id).archived_urls is None


def test_archive_does_not_hold_the_database_while_downloading(
    server: Server, settings: Settings, client: httpx.Client
) -> None:
    """A slow image host must not stop every other writer (webhooks, polls) meanwhile."""
    release = threading.Event()
    slow = server.route("/slow.png", Reply(200, png(), {"Content-Type": "image/png"}, release))
    job_id = insert_job(result_urls=[slow])
    other_id = insert_job("processing", completed_at=None)
    archiver = threading.Thread(
        target=archive, args=(job_id, settings, client, current().db), daemon=True
    )
    archiver.start()
    deadline = time.monotonic() + 10
    while not server.hits("/slow.png"):
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.01)

    wrote = threading.Event()

    def write_other_job() -> None:
        with session_scope() as session:
            job = session.get(Job, other_id)
            assert job is not None
            job.progress = 60
        wrote.set()

    writer = threading.Thread(target=write_other_job, daemon=True)
    writer.start()
    try:
        written_during_download = wrote.wait(3)
    finally:
        release.set()
        archiver.join(15)
        writer.join(35)
    assert written_during_download, "an unrelated write waited for the image download"
    assert load(other_id).progress == 60
    assert load(job_id).archived_urls == [f"https://variflow.example.test/results/{job_id}/1.png"]


# --- notify -----------------------------------------------------------------------------


def test_notify_records_every_attempt_and_sets_notified_at_only_on_success(
    server: Server, settings: Settings, client: httpx.Client
) -> None:
    url = server.route("/hooks/variflow", Reply(500, b"busy"), Reply(200, b"ok"))
    job_id = insert_job(
        result_urls=["https://cdn.example.test/1.png"],
        archived_urls=["https://variflow.example.test/results/x/1.png"],
        notify_url=url + "?token=tok-0f9e8d",
        idempotency_key="order-7",
    )

    assert notify(job_id, settings, client, current().db) is False
    assert load(job_id).notified_at is None
    assert finalize_events(job_id) == [f"notification to {server.host} failed: HTTP 500"]

    assert notify(job_id, settings, client, current().db) is True
    notified_at = load(job_id).notified_at
    assert notified_at is not None
    assert utcnow() - notified_at < timedelta(seconds=10)
    assert finalize_events(job_id) == [
        f"notification to {server.host} failed: HTTP 500",
        f"notified {server.host}: HTTP 200",
    ]
    # The token in the URL is not copied into the job's history.
    assert not any("tok-0f9e8d" in m for m in finalize_events(job_id))

    first, second = server.hits("/hooks/variflow")
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == notification_id(job_id)
    for request in (first, second):
        body = Webhook(SECRET).verify(request.body, request.headers)
        assert body["type"] == "job.completed"
        data = body["data"]
        assert data["id"] == str(job_id)
        assert data["status"] == "completed"
        assert data["idempotency_key"] == "order-7"
        assert data["result_urls"] == ["https://cdn.example.test/1.png"]
        assert data["archived_urls"] == ["https://variflow.example.test/results/x/1.png"]
        assert data["error_code"] is None

    # Done: a later run (a duplicate task) neither posts nor records anything.
    assert notify(job_id, settings, client, current().db) is True
    assert len(server.hits("/hooks/variflow")) == 2
    assert len(finalize_events(job_id)) == 2
    assert load(job_id).notified_at == notified_at


def test_notify_tells_a_failed_job_with_its_error(
    server: Server, settings: Settings, client: httpx.Client
) -> None:
    url = server.route("/hook", Reply(200))
    job_id = insert_job(
        "failed", error_code="upstream_failed", error_message="banned prompt", notify_url=url
    )

    assert notify(job_id, settings, client, current().db) is True

    [request] = server.hits("/hook")
    body = Webhook(SECRET).verify(request.body, request.headers)
    assert body["type"] == "job.failed"
    assert body["data"]["status"] == "failed"
    assert body["data"]["error_code"] == "upstream_failed"
    assert body["data"]["error_message"] == "banned prompt"
    assert body["data"]["result_urls"] == [] and body["data"]["archived_urls"] == []
    assert load(job_id).notified_at is not None


def test_notify_records_an_unreachable_endpoint_and_asks_for_a_retry(
    settings: Settings, client: httpx.Client
) -> None:
    job_id = insert_job(notify_url="http://127.0.0.1:9/hook", result_urls=["https://x/1.png"])

    assert notify(job_id, settings, client, current().db) is False
    assert notify(job_id, settings, client, current().db) is False

    assert finalize_events(job_id) == ["notification to 127.0.0.1:9 failed: ConnectError"] * 2
    assert load(job_id).notified_at is None


def test_notify_without_a_secret_records_why_and_sends_nothing(
    server: Server, settings: Settings, client: httpx.Client
) -> None:
    url = server.route("/hook", Reply(200))
    job_id = insert_job(notify_url=url, result_urls=["https://x/1.png"])
    unsigned = settings.model_copy(update={"notify_secret": None})

    assert notify(job_id, unsigned, client, current().db) is True

    assert server.requests == []
    assert finalize_events(job_id) == ["notify_url set but VARIFLOW_NOTIFY_SECRET is not: not sent"]
    assert load(job_id).notified_at is None


def test_notify_without_a_notify_url_does_nothing(
    server: Server, settings: Settings, client: httpx.Client
) -> None:
    job_id = insert_job(result_urls=["https://x/1.png"])

    assert notify(job_id, settings, client, current().db) is True
    assert notify(uuid.uuid4(), settings, client, current().db) is True  # a job that is gone

    assert server.requests == []
    assert finalize_events(job_id) == []


def test_final_state_is_the_job_as_it_ended(settings: Settings) -> None:
    job_id = insert_job(
        result_urls=["https://cdn.example.test/1.png"],
        archived_urls=["https://variflow.example.test/results/a/1.png"],
    )
    job = load(job_id)

    state = final_state(job)

    assert state["type"] == "job.completed"
    datetime.fromisoformat(state["timestamp"])
    assert state["data"] == {
        "id": str(job_id),
        "provider": "piapi",
        "status": JobStatus.COMPLETED.value,
        "idempotency_key": None,
        "upstream_task_id": job.upstream_task_id,
        "result_urls": ["https://cdn.example.test/1.png"],
        "archived_urls": ["https://variflow.example.test/results/a/1.png"],
        "error_code": None,
        "error_message": None,
        "created_at": job.created_at.isoformat(),
        "completed_at": job.completed_at.isoformat() if job.completed_at else None,
    }
    json.dumps(state)  # plain JSON
    assert notification_id(job_id) == notification_id(uuid.UUID(str(job_id)))
    assert notification_id(job_id) != notification_id(uuid.uuid4())


# --- finalize_job can be sent -----------------------------------------------------------


def broker_messages(settings: Settings) -> list[Path]:
    return [p for p in settings.broker_folder.iterdir() if p.is_file()]


def test_finalize_job_can_be_sent_with_the_default_settings(settings: Settings) -> None:
    before = len(broker_messages(settings))

    finalize_job.apply_async((str(uuid.uuid4()),), {"provider": "piapi"}, retry=False)

    assert len(broker_messages(settings)) == before + 1


def test_a_terminal_transition_sends_finalize_job(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = insert_job("processing", completed_at=None, notify_url="https://app.test/hook")
    before = len(broker_messages(settings))

    with caplog.at_level("WARNING", logger="worker.tasks"), session_scope() as session:
        job = lock_job(session, job_id)
        assert job is not None
        apply_update(
            session,
            job,
            UpstreamState(JobStatus.COMPLETED, Source.POLL, image_urls=("https://x/1.png",)),
        )

    assert "could not send finalize_job" not in caplog.text
    assert len(broker_messages(settings)) == before + 1
