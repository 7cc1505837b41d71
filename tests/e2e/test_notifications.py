"""After the end, end to end: the signed notification (retried with the same webhook-id),
the application's own Celery task, and archived result images served by the web app.

The tests that sign notifications and archive results to a folder share one stack (each
has its own job and receiver); those that need other settings (an application task for
every job, no result store) have a stack of their own.
"""

from __future__ import annotations

import base64
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import kombu
import pytest
import redis
from standardwebhooks.webhooks import Webhook

from sandbox.config import SandboxConfig
from tests.conftest import Configure
from tests.e2e.conftest import RunningStack, SharedStack, shared_deployment, use_shared
from tests.unit.test_finalize import Reply, Server
from worker.api import JobInfo, get_job, submit_variation
from worker.config import Settings, get_settings
from worker.finalize import notification_id
from worker.models import Job
from worker.runtime import session_scope

pytestmark = pytest.mark.e2e

SECRET = "whsec_" + base64.b64encode(b"e2e-notify-secret-of-32-bytes!!!").decode()
PIAPI = {"origin_task_id": "imagine-42", "index": "1", "prompt": "a blue heron"}


@pytest.fixture
def receiver() -> Iterator[Server]:
    """The application's endpoint: a local HTTP server that records what it is sent."""
    server = Server()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def signing(configure: Configure) -> Settings:
    """Requested before running_stack: the stack's processes copy VARIFLOW_* at start."""
    return configure(notify_secret=SECRET, notify_timeout=5)


@pytest.fixture
def on_complete_queue(configure: Configure, redis_server_url: str) -> Iterator[str]:
    queue = f"myapp-{uuid.uuid4().hex[:10]}"
    configure(on_complete_task="myapp.on_variation_done", on_complete_queue=queue)
    yield queue
    redis.Redis.from_url(redis_server_url).delete(queue, f"_kombu.binding.{queue}")


@pytest.fixture
def no_result_store(configure: Configure) -> None:
    configure(result_store="off")


def notified_at(job_id: uuid.UUID) -> datetime | None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        return job.notified_at if job else None


def finalize_events(job_id: uuid.UUID) -> list[tuple[datetime, str]]:
    return [(e.at, e.message or "") for e in get_job(job_id).events if e.source == "finalize"]


def completed(running_stack: RunningStack, job: JobInfo) -> JobInfo:
    done = running_stack.wait_terminal(job.id)
    assert done.status == "completed", done.error_message
    assert done.result_urls
    return done


# --- (a) the notification and (c) archival, on one stack ------------------------------


@pytest.fixture(scope="class")
def signing_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedStack]:
    """One stack for TestNotifiedAndArchived: notifications signed, results archived
    to a folder."""
    home = tmp_path_factory.mktemp("notifications")
    settings = {
        "VARIFLOW_NOTIFY_SECRET": SECRET,
        "VARIFLOW_NOTIFY_TIMEOUT": "5",
        "VARIFLOW_RESULT_STORE": str(home / "result-store"),
    }
    config = SandboxConfig(pending_seconds=0.2, processing_seconds=0.4, seed=7)
    with shared_deployment(request, "postgres", settings, config, home) as shared:
        yield shared


class TestNotifiedAndArchived:
    """On one stack (signing_stack): each test has its own receiver and job."""

    @pytest.fixture
    def running_stack(
        self, signing_stack: SharedStack, monkeypatch: pytest.MonkeyPatch
    ) -> Iterator[RunningStack]:
        yield from use_shared(signing_stack, monkeypatch)

    @pytest.fixture
    def result_store(self, signing_stack: SharedStack) -> Path:
        return Path(signing_stack.env["VARIFLOW_RESULT_STORE"])

    def test_a_failed_notification_is_retried_with_the_same_webhook_id(
        self, running_stack: RunningStack, receiver: Server
    ) -> None:
        url = receiver.route("/hooks/variflow", Reply(500, b"busy"), Reply(200, b"thanks"))
        job = submit_variation("piapi", **PIAPI, notify_url=url)

        done = completed(running_stack, job)
        running_stack.wait_for(lambda: notified_at(job.id), what="the notification to be taken")

        first, second = receiver.hits("/hooks/variflow")
        assert (
            first.headers["webhook-id"] == second.headers["webhook-id"] == notification_id(job.id)
        )
        archived = get_job(job.id).archived_urls
        assert len(archived) == len(done.result_urls)
        for delivery in (first, second):
            assert delivery.method == "POST"
            body = Webhook(SECRET).verify(delivery.body, delivery.headers)
            assert body["type"] == "job.completed"
            data = body["data"]
            assert data["id"] == str(job.id)
            assert data["provider"] == "piapi"
            assert data["status"] == "completed"
            assert data["upstream_task_id"] == done.upstream_task_id
            assert data["result_urls"] == done.result_urls
            assert data["archived_urls"] == archived
            assert data["error_code"] is None
        events = finalize_events(job.id)
        messages = [message for _, message in events]
        failed = messages.index(f"notification to {receiver.host} failed: HTTP 500")
        taken = messages.index(f"notified {receiver.host}: HTTP 200")
        assert failed < taken
        assert sum("notif" in m for m in messages) == 2  # one event per attempt
        # The retry waited for its backoff (it starts at 0.5-1 s).
        assert (events[taken][0] - events[failed][0]).total_seconds() >= 0.4
        assert len(receiver.hits("/hooks/variflow")) == 2

    def test_a_failed_job_is_notified_too(
        self, running_stack: RunningStack, receiver: Server
    ) -> None:
        running_stack.sandbox.state.update_config(api_keys=["someone-elses-key"])
        url = receiver.route("/hooks/variflow", Reply(204))
        job = submit_variation("piapi", **PIAPI, notify_url=url)

        done = running_stack.wait_terminal(job.id)
        running_stack.wait_for(lambda: notified_at(job.id), what="the notification to be taken")

        assert done.status == "failed"
        [delivery] = receiver.hits("/hooks/variflow")
        body = Webhook(SECRET).verify(delivery.body, delivery.headers)
        assert body["type"] == "job.failed"
        assert body["data"]["status"] == "failed"
        assert body["data"]["error_code"] == done.error_code == "upstream_rejected"
        assert body["data"]["archived_urls"] == []

    def test_result_images_are_archived_and_served_by_the_web_app(
        self, result_store: Path, running_stack: RunningStack
    ) -> None:
        job = submit_variation("piapi", **PIAPI)
        done = completed(running_stack, job)

        archived = running_stack.wait_for(
            lambda: get_job(job.id).archived_urls, what="the results to be archived"
        )

        assert get_settings().results_folder == result_store.resolve()
        assert len(archived) == len(done.result_urls)
        folder = result_store / str(job.id)
        for archived_url, provider_url in zip(archived, done.result_urls, strict=True):
            assert archived_url.startswith(f"{running_stack.web_url}/results/{job.id}/")
            served = httpx.get(archived_url, timeout=10)
            assert served.status_code == 200, archived_url
            assert served.content.startswith(b"\x89PNG\r\n\x1a\n")
            stored = folder / archived_url.rsplit("/", 1)[1]
            assert stored.read_bytes() == served.content
            assert httpx.get(provider_url, timeout=10).content == served.content
        n = len(archived)
        assert f"archived {n} of {n} result image(s)" in [m for _, m in finalize_events(job.id)]


# --- stacks of their own: settings that the tests above must not have --------------


# --- (b) the application's Celery task --------------------------------------------------


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_the_on_complete_task_is_sent_to_the_applications_queue(
    on_complete_queue: str, running_stack: RunningStack, redis_url: str
) -> None:
    job = submit_variation("piapi", **PIAPI)
    own = submit_variation(
        "piapi", **{**PIAPI, "prompt": "a red heron"}, on_complete_task="myapp.heron_done"
    )
    for each in (job, own):
        completed(running_stack, each)

    messages = {}
    with kombu.Connection(redis_url) as connection:
        queue = connection.SimpleQueue(on_complete_queue)
        try:
            for _ in range(2):
                message = queue.get(block=True, timeout=30)
                message.ack()
                args, kwargs, _embed = message.decode()
                messages[args[0]] = (message.headers, args, kwargs)
        finally:
            queue.close()

    assert set(messages) == {str(job.id), str(own.id)}
    headers, args, kwargs = messages[str(job.id)]
    assert headers["task"] == "myapp.on_variation_done"
    assert args == [str(job.id)]
    assert kwargs == {"status": "completed", "provider": "piapi"}
    headers, args, kwargs = messages[str(own.id)]
    assert headers["task"] == "myapp.heron_done"  # the job's own task wins
    assert args[0] == str(own.id)
    # Recorded just after the send.
    for each, name in ((job, "myapp.on_variation_done"), (own, "myapp.heron_done")):
        running_stack.wait_for(
            lambda j=each, n=name: ("sent task " + n) in [m for _, m in finalize_events(j.id)],
            what=f"the {name} send to be recorded",
        )


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_nothing_is_archived_when_the_result_store_is_off(
    signing: Settings, no_result_store: None, running_stack: RunningStack, receiver: Server
) -> None:
    url = receiver.route("/hooks/variflow", Reply(200))
    job = submit_variation("piapi", **PIAPI, notify_url=url)

    done = completed(running_stack, job)
    # The notification is sent after the archive step: once it is taken, archiving is over.
    running_stack.wait_for(lambda: notified_at(job.id), what="the notification to be taken")

    assert get_job(job.id).archived_urls == []
    [delivery] = receiver.hits("/hooks/variflow")
    body = Webhook(SECRET).verify(delivery.body, delivery.headers)
    assert body["data"]["result_urls"] == done.result_urls
    assert body["data"]["archived_urls"] == []
    assert not any(m.startswith("archived") for _, m in finalize_events(job.id))
    assert not (get_settings().home.resolve() / "results" / str(job.id)).exists()
