"""Sandbox capacity per API key: PiAPI slots and staging, PiAPI's daily allowance of
failed tasks, LemonData's request rate, Piclaza's concurrency, and their stats.

Time is a ManualClock: every step below is an exact instant, nothing sleeps.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from sandbox.capacity import key_fingerprint
from sandbox.clock import ManualClock
from sandbox.config import SandboxConfig
from sandbox.piapi_envelope import GO_ZERO_TIME, iso_time
from sandbox.server import SandboxServer
from sandbox.state import SandboxState
from sandbox.testing import WebhookReceiver, png_bytes

KEY = "sandbox-key"
OTHER = "other-key"
START = datetime(2025, 3, 1, 23, 0, tzinfo=UTC)
PIAPI = "/piapi/api/v1/task"
PICLAZA = "/piclaza/task/v1/image/vary"
LEMONDATA = "/lemondata/v1/images/variations"


@pytest.fixture
def sandbox_clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    # Every task: 10 s pending, 20 s processing, so it holds its slot for 30 s.
    return SandboxConfig(api_keys=[KEY, OTHER], pending_seconds=10, processing_seconds=20, seed=6)


def create_piapi(client: FlaskClient, key: str = KEY) -> TestResponse:
    body = {
        "model": "midjourney",
        "task_type": "variation",
        "input": {"origin_task_id": "o", "index": "1", "prompt": "p"},
    }
    return client.post(PIAPI, json=body, headers={"X-API-Key": key})


def piapi_task(client: FlaskClient, key: str = KEY) -> str:
    answer = create_piapi(client, key)
    assert answer.status_code == 200, answer.json
    task_id: str = answer.json["data"]["task_id"]
    return task_id


def piapi_data(client: FlaskClient, task_id: str) -> dict[str, Any]:
    data: dict[str, Any] = client.get(f"{PIAPI}/{task_id}", headers={"X-API-Key": KEY}).json["data"]
    return data


def piapi_statuses(client: FlaskClient, *task_ids: str) -> list[str]:
    return [piapi_data(client, task_id)["status"] for task_id in task_ids]


def create_piclaza(client: FlaskClient) -> TestResponse:
    return client.post(
        PICLAZA, json={"image_url": "https://a.test/x.png"}, headers={"X-API-Key": KEY}
    )


def lemondata_auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create_lemondata(client: FlaskClient, key: str = KEY) -> TestResponse:
    return client.post(
        LEMONDATA,
        data={"image": (io.BytesIO(png_bytes()), "a.png")},
        headers=lemondata_auth(key),
        content_type="multipart/form-data",
    )


def poll_lemondata(client: FlaskClient, task_id: str, key: str = KEY) -> TestResponse:
    return client.get(f"/lemondata/v1/tasks/{task_id}", headers=lemondata_auth(key))


def capacity(state: SandboxState, provider: str, key: str = KEY) -> dict[str, Any]:
    report: dict[str, Any] = state.stats()["capacity"][provider][key_fingerprint(key)]
    return report


def at(seconds: float) -> str:
    """PiAPI's rendering of START + seconds."""
    return iso_time((START + timedelta(seconds=seconds)).timestamp())


# -- defaults ------------------------------------------------------------------


def test_without_limits_nothing_is_staged_or_refused_and_high_water_is_tracked(
    client: FlaskClient, state: SandboxState, sandbox_clock: ManualClock
) -> None:
    ids = [piapi_task(client) for _ in range(5)]
    assert piapi_statuses(client, *ids) == ["pending"] * 5
    sandbox_clock.advance(30)
    piapi_task(client)
    piapi_task(client)
    assert capacity(state, "piapi") == {
        "limits": {"max_concurrent": None, "daily_failed_allowance": None},
        "running": 2,
        "high_water": 5,
        "staged_now": 0,
        "staged_total": 0,
        "failed_today": 0,
        "refused": {"rate_limited": 0, "over_concurrency": 0, "daily_allowance": 0},
    }
    answer = create_lemondata(client)
    assert answer.status_code == 200
    assert "X-RateLimit-Limit" not in answer.headers


# -- PiAPI slots ---------------------------------------------------------------


def test_piapi_tasks_beyond_the_slots_are_staged_then_start_in_order(
    client: FlaskClient, state: SandboxState, sandbox_clock: ManualClock
) -> None:
    state.update_config(piapi_max_concurrent={KEY: 2})
    first = piapi_task(client)  # t=0, ends at 30
    sandbox_clock.advance(5)
    second = piapi_task(client)  # t=5, ends at 35
    staged = create_piapi(client).json["data"]
    third, fourth = staged["task_id"], piapi_task(client)
    assert staged["status"] == "staged"
    assert staged["meta"]["started_at"] == GO_ZERO_TIME
    assert staged["meta"]["usage"]["frozen"] > 0
    assert piapi_statuses(client, first, second, third, fourth) == [
        "pending",
        "pending",
        "staged",
        "staged",
    ]

    sandbox_clock.advance(24)  # t=29: no slot has freed yet
    assert piapi_statuses(client, third, fourth) == ["staged", "staged"]

    # t=46, read at once: each staged task started when a slot freed (30, then 35),
    # not when somebody looked; started_at is that moment + 10 s pending.
    sandbox_clock.advance(17)
    assert piapi_statuses(client, first, second, third, fourth) == [
        "completed",
        "completed",
        "processing",
        "processing",
    ]
    assert piapi_data(client, third)["meta"]["started_at"] == at(40)
    assert piapi_data(client, fourth)["meta"]["started_at"] == at(45)
    report = capacity(state, "piapi")
    assert report["limits"]["max_concurrent"] == 2
    assert (report["running"], report["high_water"]) == (2, 2)
    assert (report["staged_now"], report["staged_total"]) == (0, 2)


def test_slots_and_lines_are_per_key_with_a_wildcard_default(
    client: FlaskClient, state: SandboxState
) -> None:
    state.update_config(piapi_max_concurrent={"*": 1, OTHER: 2})
    mine = [piapi_task(client) for _ in range(2)]
    others = [piapi_task(client, OTHER) for _ in range(3)]
    assert piapi_statuses(client, *mine) == ["pending", "staged"]
    assert piapi_statuses(client, *others) == ["pending", "pending", "staged"]
    assert capacity(state, "piapi")["high_water"] == 1
    assert capacity(state, "piapi", OTHER)["high_water"] == 2
    assert capacity(state, "piapi", OTHER)["staged_total"] == 1


def test_cancelling_frees_a_place_in_line_or_a_slot_at_once(
    client: FlaskClient, state: SandboxState, sandbox_clock: ManualClock
) -> None:
    state.update_config(piapi_max_concurrent={KEY: 1})
    running, leaving, waiting = (piapi_task(client) for _ in range(3))
    assert client.delete(f"{PIAPI}/{leaving}", headers={"X-API-Key": KEY}).status_code == 200
    cancelled = piapi_data(client, leaving)
    assert (cancelled["status"], cancelled["error"]["message"]) == (
        "failed",
        "task canceled by user",
    )
    assert piapi_statuses(client, running, waiting) == ["pending", "staged"]

    sandbox_clock.advance(3)
    assert client.delete(f"{PIAPI}/{running}", headers={"X-API-Key": KEY}).status_code == 200
    assert piapi_statuses(client, waiting) == ["pending"]
    sandbox_clock.advance(10)  # the slot was taken at t=3: processing since t=13
    assert piapi_data(client, waiting)["meta"]["started_at"] == at(13)
    assert capacity(state, "piapi")["high_water"] == 1


def test_raising_the_limit_starts_staged_tasks_at_once(
    client: FlaskClient, state: SandboxState
) -> None:
    state.update_config(piapi_max_concurrent={KEY: 1})
    ids = [piapi_task(client) for _ in range(3)]
    assert piapi_statuses(client, *ids) == ["pending", "staged", "staged"]
    answer = client.post("/_sandbox/config", json={"piapi_max_concurrent": {KEY: 2}})
    assert answer.status_code == 200
    assert piapi_statuses(client, *ids) == ["pending", "pending", "staged"]
    client.post("/_sandbox/config", json={"piapi_max_concurrent": {}})
    assert piapi_statuses(client, *ids) == ["pending"] * 3
    assert capacity(state, "piapi")["high_water"] == 3


# -- PiAPI daily allowance of failed tasks ------------------------------------------


def test_failed_tasks_use_up_the_daily_allowance_until_the_next_utc_day(
    client: FlaskClient, state: SandboxState, sandbox_clock: ManualClock
) -> None:
    state.update_config(fail_rate=1.0, piapi_daily_failed_allowance={"*": 2})
    # Doomed tasks count only once they have failed.
    ids = [piapi_task(client) for _ in range(3)]
    sandbox_clock.advance(30)
    assert piapi_statuses(client, *ids) == ["failed"] * 3

    refused = create_piapi(client)
    assert refused.status_code == 403
    assert refused.json["code"] == 403
    assert "daily limit of incorrect tasks" in refused.json["message"]
    assert "2025-03-02T00:00:00Z" in refused.json["message"]
    assert len(state.tasks()) == 3
    assert create_piapi(client, OTHER).status_code == 200
    report = capacity(state, "piapi")
    assert report["failed_today"] == 3
    assert report["refused"]["daily_allowance"] == 1

    sandbox_clock.advance_to(datetime(2025, 3, 1, 23, 59, 59, tzinfo=UTC))
    assert create_piapi(client).status_code == 403
    sandbox_clock.advance_to(datetime(2025, 3, 2, tzinfo=UTC))
    assert create_piapi(client).status_code == 200
    assert capacity(state, "piapi")["failed_today"] == 0
    assert capacity(state, "piapi")["refused"]["daily_allowance"] == 2


def test_a_failure_counts_on_the_utc_day_it_happens_and_cancels_never_count(
    client: FlaskClient, state: SandboxState, sandbox_clock: ManualClock
) -> None:
    state.update_config(fail_rate=1.0, piapi_daily_failed_allowance={KEY: 1})
    cancelled = piapi_task(client)
    client.delete(f"{PIAPI}/{cancelled}", headers={"X-API-Key": KEY})
    sandbox_clock.advance_to(datetime(2025, 3, 1, 23, 59, 50, tzinfo=UTC))
    late = piapi_task(client)  # fails at 00:00:20 on March 2
    assert capacity(state, "piapi")["failed_today"] == 0
    sandbox_clock.advance(30)
    assert piapi_statuses(client, cancelled, late) == ["failed", "failed"]
    assert capacity(state, "piapi")["failed_today"] == 1
    assert create_piapi(client).status_code == 403


# -- LemonData request rate ------------------------------------------------------


def test_lemondata_answers_429_beyond_the_requests_per_minute_until_the_window_passes(
    client: FlaskClient, state: SandboxState, sandbox_clock: ManualClock
) -> None:
    state.update_config(lemondata_requests_per_minute={KEY: 3}, lemondata_mode="async")
    created = create_lemondata(client)
    assert created.status_code == 200
    task_id = created.json["task_id"]
    reset = str(math.ceil(START.timestamp() + 60))
    assert (created.headers["X-RateLimit-Limit"], created.headers["X-RateLimit-Reset"]) == (
        "3",
        reset,
    )
    remaining = [poll_lemondata(client, task_id).headers["X-RateLimit-Remaining"]]
    remaining.append(poll_lemondata(client, task_id).headers["X-RateLimit-Remaining"])
    assert [created.headers["X-RateLimit-Remaining"], *remaining] == ["2", "1", "0"]

    refused = poll_lemondata(client, task_id)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "60"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert refused.json["error"]["code"] == "rate_limit_exceeded"
    assert refused.json["error"]["retry_after"] == 60
    assert create_lemondata(client).status_code == 429
    assert len(state.tasks()) == 1
    # Another key has its own window; a wrong key is refused before it is counted.
    assert poll_lemondata(client, task_id, OTHER).status_code == 200
    assert poll_lemondata(client, task_id, "wrong").status_code == 401

    sandbox_clock.advance(59)
    assert poll_lemondata(client, task_id).headers["Retry-After"] == "1"
    sandbox_clock.advance(1)
    assert poll_lemondata(client, task_id).status_code == 200
    assert capacity(state, "lemondata")["refused"]["rate_limited"] == 3
    assert capacity(state, "lemondata")["limits"] == {"requests_per_minute": 3}


def test_the_lemondata_window_slides(
    client: FlaskClient, state: SandboxState, sandbox_clock: ManualClock
) -> None:
    state.update_config(lemondata_requests_per_minute={"*": 3})
    missing = "task_missing"
    assert poll_lemondata(client, missing).status_code == 404  # t=0, counted too
    sandbox_clock.advance(30)
    assert [poll_lemondata(client, missing).status_code for _ in range(3)] == [404, 404, 429]
    sandbox_clock.advance(30)  # t=60: the request of t=0 has left the window
    assert poll_lemondata(client, missing).status_code == 404
    refused = poll_lemondata(client, missing)
    assert (refused.status_code, refused.headers["Retry-After"]) == (429, "30")


# -- Piclaza concurrency -----------------------------------------------------------


def test_piclaza_refuses_creates_beyond_its_concurrency_with_a_nonzero_code(
    client: FlaskClient, state: SandboxState, sandbox_clock: ManualClock
) -> None:
    state.update_config(piclaza_max_concurrent={KEY: 2})
    assert [create_piclaza(client).json["code"] for _ in range(2)] == [0, 0]
    refused = create_piclaza(client)
    assert refused.status_code == 200
    assert set(refused.json) == {"code", "message"}
    assert refused.json["code"] == 429
    assert "concurrency limit" in refused.json["message"]
    assert len(state.tasks()) == 2

    sandbox_clock.advance(30)
    assert create_piclaza(client).json["code"] == 0
    report = capacity(state, "piclaza")
    assert report["refused"] == {"rate_limited": 0, "over_concurrency": 1, "daily_allowance": 0}
    assert (report["high_water"], report["staged_total"]) == (2, 0)


# -- stats -----------------------------------------------------------------------


def test_stats_name_keys_by_fingerprint_only(client: FlaskClient, state: SandboxState) -> None:
    state.update_config(piclaza_max_concurrent={"*": 1})
    create_piclaza(client)
    create_piclaza(client)
    piapi_task(client, OTHER)
    served = client.get("/_sandbox/stats")
    assert KEY not in served.text and OTHER not in served.text
    report = served.json["capacity"]
    fingerprint = key_fingerprint(KEY)
    assert list(report) == ["piapi", "piclaza", "lemondata"]
    assert list(report["piclaza"]) == [fingerprint]
    assert report["piclaza"][fingerprint]["refused"]["over_concurrency"] == 1
    assert list(report["piapi"]) == [key_fingerprint(OTHER)]
    # The same fingerprint Piclaza shows as the key's user id, and tasks carry it.
    task_id = state.tasks()[0].task_id
    query = client.post(
        f"{PICLAZA}/result", json={"task_ids": [task_id]}, headers={"X-API-Key": KEY}
    )
    assert query.json["data"]["results"][0]["user_id"] == f"user_{fingerprint}"
    assert state.tasks()[0].key_fingerprint == fingerprint

    state.reset(keep_config=True)
    assert state.stats()["capacity"] == {"piapi": {}, "piclaza": {}, "lemondata": {}}


# -- webhooks of staged tasks, over real HTTP -------------------------------------


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


def test_a_staged_task_sends_its_webhooks_when_its_slot_frees_without_any_poll(
    receiver: WebhookReceiver,
) -> None:
    clock = ManualClock(START)
    config = SandboxConfig(
        pending_seconds=10, processing_seconds=20, piapi_max_concurrent={"*": 1}, seed=8
    )
    with SandboxServer(config, clock=clock) as sandbox, httpx.Client() as http:

        def create(name: str) -> None:
            body = {
                "model": "midjourney",
                "task_type": "variation",
                "input": {"origin_task_id": "o", "index": "1", "prompt": name},
                "config": {"webhook_config": {"endpoint": f"{receiver.url}/{name}"}},
            }
            answer = http.post(f"{sandbox.url}{PIAPI}", json=body, headers={"X-API-Key": KEY})
            assert answer.status_code == 200

        create("first")
        create("second")
        receiver.wait_for(2)  # first: pending; second: staged
        clock.advance(30)  # first ends; second takes its slot at t=30
        receiver.wait_for(5)
        clock.advance(30)
        received = receiver.wait_for(7)

        def statuses(path: str) -> list[str]:
            return [hook.json["data"]["status"] for hook in received if hook.path == path]

        assert statuses("/first") == ["pending", "processing", "completed"]
        assert statuses("/second") == ["staged", "pending", "processing", "completed"]
        assert sandbox.state.stats()["requests"]["by_route"] == {"POST /piapi/api/v1/task": 2}
