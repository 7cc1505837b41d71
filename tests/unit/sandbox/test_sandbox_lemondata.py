"""Sandbox LemonData emulation: auth, multipart validation, sync, async + poll."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from flask.testing import FlaskClient
from PIL import Image

from sandbox.config import SandboxConfig
from sandbox.state import SandboxState
from sandbox.testing import png_bytes, wait_until

AUTH = {"Authorization": "Bearer sandbox-key"}
CREATE = "/lemondata/v1/images/variations"


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    return SandboxConfig(pending_seconds=0.05, processing_seconds=0.1, seed=3)


def form(image: bytes | None = None, **fields: str) -> dict[str, Any]:
    data: dict[str, Any] = dict(fields)
    data["image"] = (io.BytesIO(png_bytes() if image is None else image), "in.png")
    return data


def post(client: FlaskClient, data: dict[str, Any], headers: dict[str, str] = AUTH) -> Any:
    return client.post(CREATE, data=data, headers=headers, content_type="multipart/form-data")


def test_missing_bearer_is_401_invalid_request(client: FlaskClient) -> None:
    answer = post(client, form(), headers={})
    assert answer.status_code == 401
    error = answer.json["error"]
    assert error["code"] == "invalid_api_key"
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    assert error["message"]


def test_wrong_key_is_401_authentication_error(client: FlaskClient) -> None:
    answer = post(client, form(), headers={"Authorization": "Bearer wrong"})
    assert answer.status_code == 401
    assert answer.json["error"]["type"] == "authentication_error"
    assert answer.json["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("data", "param", "code"),
    [
        ({"n": "1"}, "image", "missing_required_parameter"),
        (form(png_bytes(image_format="JPEG")), "image", "invalid_image_format"),
        (form(b"not an image"), "image", "invalid_image_format"),
        (form(png_bytes(64, 32)), "image", "invalid_image_dimensions"),
        (form(model="dall-e-3"), "model", "invalid_value"),
        (form(n="0"), "n", "invalid_value"),
        (form(n="11"), "n", "invalid_value"),
        (form(n="two"), "n", "invalid_value"),
        (form(size="300x300"), "size", "invalid_value"),
        (form(response_format="png"), "response_format", "invalid_value"),
    ],
)
def test_invalid_upload_is_400_naming_the_param(
    client: FlaskClient, state: SandboxState, data: dict[str, Any], param: str, code: str
) -> None:
    answer = post(client, data)
    assert answer.status_code == 400
    error = answer.json["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code
    assert state.tasks() == []


def test_image_over_the_limit_is_413(client: FlaskClient, state: SandboxState) -> None:
    image = png_bytes()
    state.update_config(lemondata_max_image_bytes=len(image) - 1)
    answer = post(client, form(image))
    assert answer.status_code == 413
    assert answer.json["error"]["code"] == "file_too_large"
    assert answer.json["error"]["param"] == "image"


def test_sync_answers_when_done_with_n_urls(client: FlaskClient, state: SandboxState) -> None:
    answer = post(client, form(n="3", size="512x512", user="job-1"))
    assert answer.status_code == 200
    assert set(answer.json) == {"created", "data"}
    urls = [item["url"] for item in answer.json["data"]]
    assert len(urls) == 3
    served = client.get(urls[0].removeprefix("http://localhost"))
    with Image.open(io.BytesIO(served.data)) as image:
        assert (image.format, image.size) == ("PNG", (512, 512))
    assert state.task_by_correlation("job-1") is not None


def test_sync_b64_json_returns_png_bytes(client: FlaskClient) -> None:
    answer = post(client, form(response_format="b64_json", size="256x256"))
    (item,) = answer.json["data"]
    assert set(item) == {"b64_json"}
    assert base64.b64decode(item["b64_json"]).startswith(b"\x89PNG")


def test_sync_decided_failure_is_400_generation_failed(
    client: FlaskClient, state: SandboxState
) -> None:
    state.update_config(fail_rate=1.0)
    answer = post(client, form())
    assert answer.status_code == 400
    assert answer.json["error"]["code"] == "generation_failed"
    assert answer.json["error"]["message"] == state.tasks()[0].error_message


@pytest.mark.parametrize("poll_prefix", ["/v1/images/generations/", "/v1/tasks/"])
def test_async_answers_pending_then_poll_completes(
    client: FlaskClient, state: SandboxState, poll_prefix: str
) -> None:
    state.update_config(lemondata_mode="async", processing_seconds=1.0)
    answer = post(client, form(n="2", size="256x256", user="job-2"))
    assert answer.status_code == 200
    created = answer.json
    assert created["status"] == "pending"
    assert created["data"] == [{"url": ""}]
    task_id = created["task_id"]
    assert created["poll_url"] == f"/v1/images/generations/{task_id}"

    def poll() -> Any:
        return client.get(f"/lemondata{poll_prefix}{task_id}", headers=AUTH).json

    assert poll()["status"] in ("pending", "processing")
    wait_until(lambda: poll()["status"] == "completed")
    done = poll()
    assert done["task_id"] == task_id
    assert len(done["data"]) == 2
    assert all(item["url"].startswith("http://localhost/files/") for item in done["data"])
    assert "error" not in done


def test_async_failure_is_reported_on_poll(client: FlaskClient, state: SandboxState) -> None:
    state.update_config(lemondata_mode="async", fail_rate=1.0)
    task_id = post(client, form()).json["task_id"]
    url = f"/lemondata/v1/tasks/{task_id}"
    wait_until(lambda: client.get(url, headers=AUTH).json["status"] == "failed")
    failed = client.get(url, headers=AUTH).json
    assert failed["error"] == state.tasks()[0].error_message
    assert failed["data"] == []


def test_unknown_task_poll_is_404_async_task_not_found(client: FlaskClient) -> None:
    answer = client.get("/lemondata/v1/images/generations/task_nope", headers=AUTH)
    assert answer.status_code == 404
    assert answer.json == {
        "error": {
            "message": "Task not found or no longer available.",
            "type": "invalid_request_error",
            "code": "async_task_not_found",
        }
    }


def test_mixed_mode_uses_both_answers(client: FlaskClient, state: SandboxState) -> None:
    state.update_config(lemondata_mode="mixed", pending_seconds=0, processing_seconds=0)
    kinds = {"task_id" in post(client, form()).json for _ in range(20)}
    assert kinds == {True, False}
