"""Sandbox Piclaza emulation: auth, validation, create answer, batch query."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from flask.testing import FlaskClient

from sandbox.config import SandboxConfig
from sandbox.state import SandboxState
from sandbox.testing import png_bytes, wait_until

KEY = {"X-API-Key": "sandbox-key"}
CREATE = "/piclaza/task/v1/image/vary"
QUERY = "/piclaza/task/v1/image/vary/result"
DATA_URI = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    return SandboxConfig(pending_seconds=0.05, processing_seconds=0.1, seed=2)


def create(client: FlaskClient, **payload: Any) -> str:
    answer = client.post(CREATE, json=payload, headers=KEY)
    assert answer.status_code == 200, answer.json
    task_id: str = answer.json["data"]["results"][0]["task_id"]
    return task_id


def query(client: FlaskClient, *ids: str) -> list[dict[str, Any]]:
    answer = client.post(QUERY, json={"task_ids": list(ids)}, headers=KEY)
    assert answer.status_code == 200
    assert answer.json["code"] == 0
    results: list[dict[str, Any]] = answer.json["data"]["results"]
    return results


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "nope"}])
def test_missing_or_wrong_key_is_401(client: FlaskClient, headers: dict[str, str]) -> None:
    for path in (CREATE, QUERY):
        answer = client.post(path, json={"image_url": "https://a.test/x.png"}, headers=headers)
        assert answer.status_code == 401
        assert answer.json["code"] == 401
        assert answer.json["message"]


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({}, "exactly one"),
        ({"image_url": "https://a.test/x.png", "image_file_b64": DATA_URI}, "exactly one"),
        ({"image_url": "ftp://a.test/x.png"}, "image_url"),
        ({"image_url": "not a url"}, "image_url"),
        ({"image_file_b64": DATA_URI}, "image_name"),
        ({"image_file_b64": "iVBORw0KGgo=", "image_name": "a.png"}, "image_file_b64"),
        ({"image_file_b64": "data:image/png;base64,!!!!", "image_name": "a.png"}, "image_file_b64"),
        ({"image_file_b64": "data:image/png;base64,aGVsbG8=", "image_name": "a"}, "image_file_b64"),
        ({"image_url": "https://a.test/x.png", "source": "mobile"}, "source"),
    ],
)
def test_invalid_create_is_400(
    client: FlaskClient, state: SandboxState, payload: dict[str, Any], words: str
) -> None:
    answer = client.post(CREATE, json=payload, headers=KEY)
    assert answer.status_code == 400
    assert answer.json["code"] == 400
    assert words in answer.json["message"]
    assert state.tasks() == []


def test_create_answer_has_results_and_full_group(client: FlaskClient) -> None:
    answer = client.post(
        CREATE, json={"image_url": "https://a.test/x.png", "title": "job-7"}, headers=KEY
    )
    assert answer.json["code"] == 0
    assert answer.json["message"] == ""
    (result,) = answer.json["data"]["results"]
    assert result["code"] == 0
    assert result["message"] == ""
    assert result["type"] == "image_variation"
    group = answer.json["data"]["group"]
    assert set(group) == {
        "group_id",
        "user_id",
        "type",
        "source",
        "status",
        "title",
        "cover_image_url",
        "cover_video_url",
        "task_ids",
        "task_count",
        "meta",
        "created_at",
        "updated_at",
    }
    assert group["task_ids"] == [result["task_id"]]
    assert group["task_count"] == 1
    assert group["title"] == "job-7"


def test_task_goes_queued_to_ok_with_image_urls(client: FlaskClient, state: SandboxState) -> None:
    state.update_config(pending_seconds=30)
    waiting = create(client, image_url="https://a.test/x.png", title="job-0")
    (item,) = query(client, waiting)
    assert item["status"] == "queued"
    assert "image_urls" not in item
    assert item["reference"] == "https://a.test/x.png"
    for field in ("request_id", "user_id", "type", "sketch", "prompt", "negative_prompt"):
        assert field in item

    state.update_config(pending_seconds=0.05)
    task_id = create(client, image_url="https://a.test/x.png", title="job-1")
    wait_until(lambda: query(client, task_id)[0]["status"] == "ok")
    (item,) = query(client, task_id)
    assert item["code"] == 0
    assert len(item["image_urls"]) == 4
    assert item["image_url"] == item["image_urls"][0]
    served = client.get(item["image_url"].removeprefix("http://localhost"))
    assert served.status_code == 200
    assert served.data.startswith(b"\x89PNG")


def test_uploaded_image_task_has_empty_reference(client: FlaskClient, state: SandboxState) -> None:
    task_id = create(client, image_file_b64=DATA_URI, image_name="a.png", title="job-b64")
    assert query(client, task_id)[0]["reference"] == ""
    assert DATA_URI not in str(state.tasks()[0].request)


def test_failed_task_keeps_code_zero_and_carries_the_reason(
    client: FlaskClient, state: SandboxState
) -> None:
    state.update_config(fail_rate=1.0)
    task_id = create(client, image_url="https://a.test/x.png")
    wait_until(lambda: query(client, task_id)[0]["status"] == "failed")
    (item,) = query(client, task_id)
    assert item["code"] == 0
    assert item["message"] == state.tasks()[0].error_message != ""
    assert "image_urls" not in item


def test_batch_query_answers_unknown_ids_per_item(client: FlaskClient, state: SandboxState) -> None:
    first = create(client, image_url="https://a.test/1.png", title="a")
    second = create(client, image_url="https://a.test/2.png", title="b")
    items = query(client, first, "missing-id", second)
    assert [item["task_id"] for item in items] == [first, "missing-id", second]
    assert items[1] == {"code": 404, "message": "task not found", "task_id": "missing-id"}
    assert items[0]["code"] == items[2]["code"] == 0
    assert state.stats()["piclaza_batch"] == {"queries": 1, "ids": 3}


@pytest.mark.parametrize(
    "payload",
    [{}, {"task_ids": []}, {"task_ids": "abc"}, {"task_ids": [""]}, {"task_ids": ["x"] * 101}],
)
def test_bad_batch_query_is_400(client: FlaskClient, payload: dict[str, Any]) -> None:
    answer = client.post(QUERY, json=payload, headers=KEY)
    assert answer.status_code == 400
    assert answer.json["code"] == 400


def test_titles_created_twice_are_reported(client: FlaskClient, state: SandboxState) -> None:
    create(client, image_url="https://a.test/x.png", title="job-9")
    create(client, image_url="https://a.test/x.png", title="job-9")
    create(client, image_url="https://a.test/x.png")
    create(client, image_url="https://a.test/x.png")
    assert state.stats()["duplicate_creates"] == ["job-9"]
    assert state.stats()["creates"]["piclaza"] == 4
