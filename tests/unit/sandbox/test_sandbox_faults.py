"""Sandbox fault knobs: transient errors, rate limiting, malformed JSON, slow answers."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import pytest
from flask.testing import FlaskClient

from sandbox.app import create_sandbox_app
from sandbox.config import SandboxConfig
from sandbox.context import EXTENSION_KEY
from sandbox.state import SandboxState
from sandbox.testing import png_bytes

PIAPI_BODY = {
    "model": "midjourney",
    "task_type": "variation",
    "input": {"origin_task_id": "o", "index": "1", "prompt": "p"},
}


def create_piapi(client: FlaskClient) -> Any:
    return client.post("/piapi/api/v1/task", json=PIAPI_BODY, headers={"X-API-Key": "sandbox-key"})


def create_piclaza(client: FlaskClient) -> Any:
    return client.post(
        "/piclaza/task/v1/image/vary",
        json={"image_url": "https://a.test/x.png", "title": "t"},
        headers={"X-API-Key": "sandbox-key"},
    )


def create_lemondata(client: FlaskClient) -> Any:
    return client.post(
        "/lemondata/v1/images/variations",
        data={"image": (io.BytesIO(png_bytes()), "a.png"), "user": "u"},
        headers={"Authorization": "Bearer sandbox-key"},
        content_type="multipart/form-data",
    )


CREATES = {"piapi": create_piapi, "piclaza": create_piclaza, "lemondata": create_lemondata}


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    return SandboxConfig(pending_seconds=0, processing_seconds=0, seed=4)


@pytest.mark.parametrize("provider", sorted(CREATES))
@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_transient_error_on_create_creates_no_task(
    client: FlaskClient, state: SandboxState, provider: str, status: int
) -> None:
    state.update_config(transient_error_rate=1.0, transient_error_codes=[status])
    answer = CREATES[provider](client)
    assert answer.status_code == status
    if provider == "lemondata":
        assert answer.json["error"]["message"]
        if status == 429:
            assert answer.json["error"]["code"] == "rate_limit_exceeded"
    else:
        assert answer.json["code"] == status
        assert answer.json["message"]
    if status == 429:
        assert answer.headers["Retry-After"] == "1"
    else:
        assert "Retry-After" not in answer.headers
    assert state.tasks() == []
    assert state.stats()["faults"]["transient"] == 1

    state.update_config(transient_error_rate=0.0)
    assert CREATES[provider](client).status_code == 200
    assert len(state.tasks()) == 1


def test_rate_limit_all_answers_429_everywhere(client: FlaskClient, state: SandboxState) -> None:
    state.update_config(rate_limit_all=True, retry_after_seconds=7)
    for create in CREATES.values():
        answer = create(client)
        assert answer.status_code == 429
        assert answer.headers["Retry-After"] == "7"
    polled = client.get("/piapi/api/v1/task/x", headers={"X-API-Key": "sandbox-key"})
    assert polled.status_code == 429
    assert state.tasks() == []
    # Files and controls stay reachable so tests can still look around.
    assert client.get("/_sandbox/stats").status_code == 200


@pytest.mark.parametrize("provider", sorted(CREATES))
def test_malformed_json_is_200_with_broken_body_and_no_task(
    client: FlaskClient, state: SandboxState, provider: str
) -> None:
    state.update_config(malformed_json_rate=1.0)
    answer = CREATES[provider](client)
    assert answer.status_code == 200
    assert answer.mimetype == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer.data)
    assert state.tasks() == []


def test_slow_answer_still_creates_the_task(client: FlaskClient, state: SandboxState) -> None:
    state.update_config(slow_rate=1.0, slow_seconds=0.2)
    started = time.monotonic()
    answer = create_piclaza(client)
    assert time.monotonic() - started >= 0.2
    assert answer.status_code == 200
    assert len(state.tasks()) == 1
    assert state.stats()["faults"]["slow"] == 1


def test_seeded_sandboxes_decide_the_same_faults_and_outcomes() -> None:
    def run() -> tuple[list[int], list[str]]:
        config = SandboxConfig(seed=11, transient_error_rate=0.5, fail_rate=0.5)
        app = create_sandbox_app(config)
        client = app.test_client()
        codes = [create_piclaza(client).status_code for _ in range(12)]
        outcomes = [t.decided_outcome for t in app.extensions[EXTENSION_KEY].tasks()]
        return codes, outcomes

    codes, outcomes = run()
    assert set(codes) > {200}
    assert set(outcomes) == {"completed", "failed"}
    assert run() == (codes, outcomes)


def test_stats_count_requests_by_route_and_status(client: FlaskClient, state: SandboxState) -> None:
    create_piapi(client)
    client.get("/piapi/api/v1/task/missing", headers={"X-API-Key": "sandbox-key"})
    client.get("/_sandbox/tasks")
    requests = state.stats()["requests"]
    assert requests["by_route"] == {
        "POST /piapi/api/v1/task": 1,
        "GET /piapi/api/v1/task/<task_id>": 1,
    }
    assert requests["by_status"] == {"200": 1, "404": 1}
    assert state.stats()["creates"] == {"piapi": 1, "piclaza": 0, "lemondata": 0}
