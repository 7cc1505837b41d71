"""Sandbox PiAPI webhooks over real HTTP: delivery, retries and the fault knobs."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from sandbox.testing import ReceivedWebhook, WebhookReceiver, wait_until

KEY = {"X-API-Key": "sandbox-key"}
SECRET = "s3cret"


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    config = SandboxConfig(
        pending_seconds=0.05,
        processing_seconds=0.1,
        webhook_retry_base_seconds=0.01,
        webhook_timeout_seconds=2,
        seed=5,
    )
    with SandboxServer(config) as server:
        yield server


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    # One client for the module: creating an httpx client costs ~0.1 s (TLS setup).
    with httpx.Client() as client:
        yield client


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


def create(
    http: httpx.Client,
    sandbox: SandboxServer,
    endpoint: str,
    secret: str | None = SECRET,
    prompt: str = "p",
) -> str:
    hook: dict[str, Any] = {"endpoint": endpoint}
    if secret is not None:
        hook["secret"] = secret
    answer = http.post(
        f"{sandbox.url}/piapi/api/v1/task",
        json={
            "model": "midjourney",
            "task_type": "variation",
            "input": {"origin_task_id": "o", "index": "1", "prompt": prompt},
            "config": {"webhook_config": hook},
        },
        headers=KEY,
    )
    assert answer.status_code == 200
    task_id: str = answer.json()["data"]["task_id"]
    return task_id


def statuses(received: list[ReceivedWebhook]) -> list[str]:
    return [hook.json["data"]["status"] for hook in received]


def webhook_stats(sandbox: SandboxServer) -> dict[str, int]:
    stats: dict[str, int] = sandbox.state.stats()["webhooks"]
    return stats


def test_server_serves_the_app_on_a_real_port(http: httpx.Client, sandbox: SandboxServer) -> None:
    assert sandbox.url.startswith("http://127.0.0.1:")
    assert http.get(f"{sandbox.url}/_sandbox/config").json()["pending_seconds"] == 0.05


def test_each_status_change_is_delivered_with_the_secret(
    http: httpx.Client, sandbox: SandboxServer, receiver: WebhookReceiver
) -> None:
    task_id = create(http, sandbox, f"{receiver.url}/webhooks/piapi/job-1")
    received = receiver.wait_for(3)
    assert statuses(received) == ["pending", "processing", "completed"]
    for hook in received:
        assert hook.path == "/webhooks/piapi/job-1"
        assert hook.headers["X-Webhook-Secret"] == SECRET
        assert isinstance(hook.json["timestamp"], int)
        assert hook.json["data"]["task_id"] == task_id
    done = received[-1].json["data"]
    polled = http.get(f"{sandbox.url}/piapi/api/v1/task/{task_id}", headers=KEY).json()["data"]
    assert done == polled
    image = http.get(done["output"]["image_urls"][0])
    with Image.open(io.BytesIO(image.content)) as png:
        assert png.format == "PNG"
    wait_until(lambda: webhook_stats(sandbox)["succeeded"] == 3)
    assert sandbox.state.task_by_correlation("job-1") is not None


def test_no_secret_means_no_secret_header(
    http: httpx.Client, sandbox: SandboxServer, receiver: WebhookReceiver
) -> None:
    create(http, sandbox, f"{receiver.url}/hook", secret=None)
    for hook in receiver.wait_for(3):
        assert "X-Webhook-Secret" not in hook.headers


def test_non_2xx_answers_are_retried_with_the_same_body(
    http: httpx.Client, sandbox: SandboxServer
) -> None:
    with WebhookReceiver(statuses=[500, 503]) as receiver:
        create(http, sandbox, f"{receiver.url}/hook")
        received = receiver.wait_for(5)
    assert [hook.answered for hook in received] == [500, 503, 200, 200, 200]
    assert received[0].body == received[1].body == received[2].body
    assert statuses(received) == ["pending", "pending", "pending", "processing", "completed"]
    wait_until(lambda: webhook_stats(sandbox)["succeeded"] == 3)
    stats = webhook_stats(sandbox)
    assert (stats["attempted"], stats["failed"], stats["gave_up"]) == (5, 2, 0)


def test_delivery_gives_up_after_the_configured_attempts(
    http: httpx.Client, sandbox: SandboxServer
) -> None:
    sandbox.state.update_config(webhook_retry_attempts=2)
    with WebhookReceiver(statuses=[500] * 100) as receiver:
        create(http, sandbox, f"{receiver.url}/hook")
        wait_until(lambda: webhook_stats(sandbox)["gave_up"] == 3)
        assert len(receiver.received()) == 6
    assert webhook_stats(sandbox)["attempted"] == 6


def test_unreachable_endpoint_counts_as_failed_attempts(
    http: httpx.Client, sandbox: SandboxServer
) -> None:
    with WebhookReceiver() as closed:
        dead_url = closed.url
    sandbox.state.update_config(webhook_retry_attempts=2)
    create(http, sandbox, f"{dead_url}/hook")
    wait_until(lambda: webhook_stats(sandbox)["gave_up"] == 3)
    attempts = sandbox.state.webhook_attempts()
    assert all(a.http_status is None and a.error for a in attempts)


def test_drop_rate_sends_nothing(
    http: httpx.Client, sandbox: SandboxServer, receiver: WebhookReceiver
) -> None:
    sandbox.state.update_config(webhook_drop_rate=1.0)
    create(http, sandbox, f"{receiver.url}/hook")
    wait_until(lambda: webhook_stats(sandbox)["status_changes"] == 3)
    assert webhook_stats(sandbox)["dropped"] == 3
    assert webhook_stats(sandbox)["attempted"] == 0
    assert receiver.received() == []


def test_duplicate_rate_sends_each_delivery_twice(
    http: httpx.Client, sandbox: SandboxServer, receiver: WebhookReceiver
) -> None:
    sandbox.state.update_config(webhook_duplicate_rate=1.0)
    create(http, sandbox, f"{receiver.url}/hook")
    received = receiver.wait_for(6)
    assert sorted(statuses(received)) == sorted(["pending", "processing", "completed"] * 2)
    bodies = [hook.body for hook in received]
    assert all(bodies.count(body) == 2 for body in bodies)
    wait_until(lambda: webhook_stats(sandbox)["succeeded"] == 6)
    assert webhook_stats(sandbox)["duplicated"] == 3


def test_reorder_sends_terminal_first_then_earlier_ones(
    http: httpx.Client, sandbox: SandboxServer, receiver: WebhookReceiver
) -> None:
    sandbox.state.update_config(webhook_reorder=True)
    create(http, sandbox, f"{receiver.url}/hook")
    received = receiver.wait_for(3)
    assert statuses(received) == ["completed", "processing", "pending"]
    timestamps = [hook.json["timestamp"] for hook in received]
    assert timestamps == sorted(timestamps, reverse=True)


def test_cancel_sends_one_failed_delivery_and_nothing_after(
    http: httpx.Client, sandbox: SandboxServer, receiver: WebhookReceiver
) -> None:
    sandbox.state.update_config(pending_seconds=1.0)
    cancelled = create(http, sandbox, f"{receiver.url}/cancelled")
    answer = http.delete(f"{sandbox.url}/piapi/api/v1/task/{cancelled}", headers=KEY)
    assert answer.status_code == 200
    # A later task's terminal change is due after every planned change of the
    # cancelled one, so once it is delivered those changes have been handled.
    create(http, sandbox, f"{receiver.url}/later")
    wait_until(lambda: [h.path for h in receiver.received()].count("/later") == 3)
    wait_until(lambda: [h.path for h in receiver.received()].count("/cancelled") == 2)
    assert webhook_stats(sandbox)["status_changes"] == 5
    mine = [hook for hook in receiver.received() if hook.path == "/cancelled"]
    assert statuses(mine) == ["pending", "failed"]
    assert mine[1].json["data"]["error"]["message"] == "task canceled by user"


def test_stop_ends_delivery_threads(http: httpx.Client) -> None:
    server = SandboxServer(SandboxConfig(pending_seconds=0.05, processing_seconds=0.05))
    with WebhookReceiver() as receiver, server:
        create(http, server, f"{receiver.url}/hook")
        receiver.wait_for(3)
    with pytest.raises(RuntimeError):
        _ = server.url
    assert not [t for t in threading.enumerate() if t.name.startswith("sandbox-webhook")]
