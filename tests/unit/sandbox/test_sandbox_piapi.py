"""Sandbox PiAPI emulation: auth, validation, envelope, lifecycle, cancel."""

from __future__ import annotations

import io
from typing import Any

import pytest
from flask.testing import FlaskClient
from PIL import Image

from sandbox.state import SandboxState
from sandbox.testing import wait_until

KEY = {"X-API-Key": "sandbox-key"}
TASKS = "/piapi/api/v1/task"


def body(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": "midjourney",
        "task_type": "variation",
        "input": {"origin_task_id": "origin-1", "index": "2", "prompt": "a red fox"},
    }
    payload.update(changes)
    return payload


def wait_status(client: FlaskClient, task_id: str, status: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def reached() -> bool:
        seen.update(client.get(f"{TASKS}/{task_id}", headers=KEY).json["data"])
        return bool(seen["status"] == status)

    wait_until(reached, message=f"status {status}")
    return seen


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}])
def test_missing_or_wrong_key_is_401(client: FlaskClient, headers: dict[str, str]) -> None:
    answer = client.post(TASKS, json=body(), headers=headers)
    assert answer.status_code == 401
    assert answer.json["code"] == 401
    assert answer.json["message"]
    assert client.get(f"{TASKS}/x", headers=headers).status_code == 401


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (body(model="dall-e-2"), "model"),
        (body(task_type="imagine"), "task_type"),
        (body(input={"index": "1", "prompt": "p"}), "input.origin_task_id"),
        (body(input={"origin_task_id": " ", "index": "1", "prompt": "p"}), "origin_task_id"),
        (body(input={"origin_task_id": "o", "index": "5", "prompt": "p"}), "input.index"),
        (body(input={"origin_task_id": "o", "index": 1, "prompt": "p"}), "input.index"),
        (body(input={"origin_task_id": "o", "index": "1"}), "input.prompt"),
        (body(input={"origin_task_id": "o", "index": "1", "prompt": ""}), "input.prompt"),
        (body(config={"webhook_config": {"endpoint": "ftp://x/y"}}), "endpoint"),
        (body(config={"service_mode": "turbo"}), "service_mode"),
    ],
)
def test_invalid_create_is_400_naming_the_field(
    client: FlaskClient, state: SandboxState, payload: dict[str, Any], field: str
) -> None:
    answer = client.post(TASKS, json=payload, headers=KEY)
    assert answer.status_code == 400
    assert answer.json["code"] == 400
    assert field in answer.json["message"]
    assert state.tasks() == []


def test_non_json_body_is_400(client: FlaskClient) -> None:
    answer = client.post(TASKS, data="model=midjourney", headers=KEY)
    assert answer.status_code == 400
    assert answer.json["code"] == 400


@pytest.mark.parametrize("index", ["1", "4", "high_variation", "low_variation"])
def test_create_answers_the_full_pending_envelope(client: FlaskClient, index: str) -> None:
    payload = body(input={"origin_task_id": "o", "index": index, "prompt": "p"})
    answer = client.post(TASKS, json=payload, headers=KEY)
    assert answer.status_code == 200
    assert answer.json["code"] == 200
    assert answer.json["message"] == "success"
    data = answer.json["data"]
    assert set(data) == {
        "task_id",
        "model",
        "task_type",
        "status",
        "config",
        "input",
        "output",
        "meta",
        "detail",
        "logs",
        "error",
    }
    assert data["status"] == "pending"
    assert data["model"] == "midjourney"
    assert data["task_type"] == "variation"
    assert data["input"]["index"] == index
    assert data["config"] == {
        "service_mode": "public",
        "webhook_config": {"endpoint": "", "secret": ""},
    }
    assert data["output"] == {
        "image_url": "",
        "image_urls": None,
        "temporary_image_urls": None,
        "discord_image_url": "",
        "actions": [],
        "progress": 0,
        "intermediate_image_urls": None,
    }
    assert set(data["meta"]) == {"created_at", "started_at", "ended_at", "usage"}
    assert data["error"] == {"code": 0, "raw_message": "", "message": "", "detail": None}


def test_task_runs_to_completion_with_real_png_files(client: FlaskClient) -> None:
    task_id = client.post(TASKS, json=body(), headers=KEY).json["data"]["task_id"]
    data = wait_status(client, task_id, "completed")
    output = data["output"]
    assert output["progress"] == 100
    assert len(output["image_urls"]) == 4
    assert output["temporary_image_urls"] == output["image_urls"]
    for url in [output["image_url"], *output["image_urls"]]:
        assert url.startswith("http://localhost/files/")
        served = client.get(url.removeprefix("http://localhost"))
        assert served.status_code == 200
        assert served.mimetype == "image/png"
        with Image.open(io.BytesIO(served.data)) as image:
            assert image.format == "PNG"
    assert client.get("/files/nothing-here.png").status_code == 404


def test_status_goes_through_processing_with_rising_progress(
    client: FlaskClient, state: SandboxState
) -> None:
    state.update_config(pending_seconds=0.05, processing_seconds=0.5)
    task_id = client.post(TASKS, json=body(), headers=KEY).json["data"]["task_id"]
    data = wait_status(client, task_id, "processing")
    assert 0 <= data["output"]["progress"] < 100
    assert data["meta"]["started_at"] != "0001-01-01T00:00:00Z"
    assert data["output"]["image_urls"] is None


def test_decided_failure_reports_error_message(client: FlaskClient, state: SandboxState) -> None:
    state.update_config(fail_rate=1.0)
    task_id = client.post(TASKS, json=body(), headers=KEY).json["data"]["task_id"]
    assert state.tasks()[0].decided_outcome == "failed"
    data = wait_status(client, task_id, "failed")
    assert data["error"]["message"]
    assert data["error"]["message"] == state.tasks()[0].error_message
    assert data["output"]["image_urls"] is None


def test_unknown_task_is_404(client: FlaskClient) -> None:
    answer = client.get(f"{TASKS}/no-such-task", headers=KEY)
    assert answer.status_code == 404
    assert answer.json == {"code": 404, "message": "task not found"}
    assert client.delete(f"{TASKS}/no-such-task", headers=KEY).status_code == 404


def test_cancel_while_pending_makes_the_task_failed(
    client: FlaskClient, state: SandboxState
) -> None:
    state.update_config(pending_seconds=30)
    task_id = client.post(TASKS, json=body(), headers=KEY).json["data"]["task_id"]
    answer = client.delete(f"{TASKS}/{task_id}", headers=KEY)
    assert answer.status_code == 200
    assert answer.json == {"code": 200, "message": f"task {task_id} canceled"}
    data = client.get(f"{TASKS}/{task_id}", headers=KEY).json["data"]
    assert data["status"] == "failed"
    assert data["error"]["message"] == "task canceled by user"
    again = client.delete(f"{TASKS}/{task_id}", headers=KEY)
    assert again.status_code == 400
    assert again.json == {"code": 400, "message": f"task {task_id} is not pending"}


def test_cancel_after_pending_is_400(client: FlaskClient, state: SandboxState) -> None:
    state.update_config(pending_seconds=0, processing_seconds=30)
    task_id = client.post(TASKS, json=body(), headers=KEY).json["data"]["task_id"]
    answer = client.delete(f"{TASKS}/{task_id}", headers=KEY)
    assert answer.status_code == 400
    assert answer.json["message"] == f"task {task_id} is not pending"
    assert client.get(f"{TASKS}/{task_id}", headers=KEY).json["data"]["status"] == "processing"


def test_correlation_is_the_webhook_path_tail_or_the_prompt(
    client: FlaskClient, state: SandboxState
) -> None:
    hook = {"webhook_config": {"endpoint": "http://127.0.0.1:9/webhooks/piapi/job-42/"}}
    client.post(TASKS, json=body(config=hook), headers=KEY)
    client.post(TASKS, json=body(), headers=KEY)
    client.post(TASKS, json=body(), headers=KEY)
    assert state.task_by_correlation("job-42") is not None
    fox = state.tasks_by_correlation("a red fox")
    assert [t.create_count for t in fox] == [1, 2]
    assert state.stats()["duplicate_creates"] == ["a red fox"]
    listed = client.get("/_sandbox/tasks").json["tasks"]
    assert {t["correlation"] for t in listed} == {"job-42", "a red fox"}
    assert all("decided_outcome" in t and "status" in t for t in listed)
    state.close()
