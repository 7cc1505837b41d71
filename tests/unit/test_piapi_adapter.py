"""The PiAPI adapter against httpx.MockTransport, with the payload shapes of docs/providers.md."""

from __future__ import annotations

import email.utils
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from worker.providers.base import (
    InputImage,
    PermanentUpstreamError,
    PollTarget,
    ProviderNotConfigured,
    SubmitRequest,
    TransientUpstreamError,
)
from worker.providers.piapi import INDEXES, PiAPIProvider
from worker.states import JobStatus, Source

BASE = "https://piapi.test"
KEY = "key-abc123"
JOB_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
URLS = ["https://cdn.piapi.test/1.png", "https://cdn.piapi.test/2.png"]
GRID = "https://cdn.piapi.test/grid.png"

Handler = Callable[[httpx.Request], httpx.Response]


class Upstream:
    """A mock PiAPI: records every request and answers with ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    def provider(self, api_key: str | None = KEY, base: str = BASE) -> PiAPIProvider:
        return PiAPIProvider(httpx.Client(transport=httpx.MockTransport(self)), base, api_key)


def envelope_data(status: str = "pending", task_id: str = "t-1", **output: Any) -> dict[str, Any]:
    """The unified task envelope's ``data``, as documented (docs/providers.md, PiAPI)."""
    return {
        "task_id": task_id,
        "model": "midjourney",
        "task_type": "variation",
        "status": status,
        "config": {
            "service_mode": "public",
            "webhook_config": {"endpoint": "https://hooks.test/x", "secret": "echoed-secret"},
        },
        "input": {"origin_task_id": "o-1", "index": "1", "prompt": "a cat"},
        "output": {
            "image_url": "",
            "image_urls": None,
            "temporary_image_urls": None,
            "discord_image_url": "",
            "actions": [],
            "progress": 0,
            "intermediate_image_urls": None,
            **output,
        },
        "meta": {
            "created_at": "2024-01-01T00:00:00Z",
            "started_at": "0001-01-01T00:00:00Z",
            "ended_at": "0001-01-01T00:00:00Z",
            "usage": {"type": "point", "frozen": 0, "consume": 0},
        },
        "detail": None,
        "logs": [],
        "error": {"code": 0, "raw_message": "", "message": "", "detail": None},
    }


def ok(data: dict[str, Any]) -> httpx.Response:
    return httpx.Response(200, json={"code": 200, "message": "success", "data": data})


def answer(data: dict[str, Any]) -> Upstream:
    return Upstream(lambda _request: ok(data))


def poll_one(provider: PiAPIProvider, task_id: str = "t-1") -> Any:
    states = provider.poll([PollTarget(JOB_ID, task_id)])
    assert list(states) == [task_id]
    return states[task_id]


VALID = {"origin_task_id": "o-1", "index": "1", "prompt": "a cat"}


# --- capabilities ---------------------------------------------------------------------


def test_capabilities() -> None:
    provider = answer(envelope_data()).provider()
    assert provider.name == "piapi"
    assert provider.supports_webhook is True
    assert provider.webhook_secret_header == "x-webhook-secret"
    assert provider.can_cancel is True
    assert provider.needs_image_bytes is False
    assert provider.batch_poll_size == 1


# --- create -----------------------------------------------------------------------------


def test_submit_sends_the_documented_body_and_header() -> None:
    upstream = answer(envelope_data("pending", task_id="t-new"))
    provider = upstream.provider()
    params = provider.validate({**VALID, "aspect_ratio": "16:9", "service_mode": "private"})
    submission = provider.submit(
        SubmitRequest(
            job_id=JOB_ID,
            params=params,
            webhook_url="https://hooks.test/webhooks/piapi/job",
            webhook_secret="per-job-secret",
        )
    )
    (request,) = upstream.requests
    assert request.method == "POST"
    assert str(request.url) == f"{BASE}/api/v1/task"
    assert request.headers["X-API-Key"] == KEY
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {
        "model": "midjourney",
        "task_type": "variation",
        "input": {"origin_task_id": "o-1", "index": "1", "prompt": "a cat", "aspect_ratio": "16:9"},
        "config": {
            "service_mode": "private",
            "webhook_config": {
                "endpoint": "https://hooks.test/webhooks/piapi/job",
                "secret": "per-job-secret",
            },
        },
    }
    state = submission.state
    assert state.status is JobStatus.SUBMITTED
    assert state.source is Source.SUBMIT
    assert state.upstream_task_id == "t-new"
    assert submission.poll_url is None
    assert params == {**VALID, "aspect_ratio": "16:9", "service_mode": "private"}  # not mutated


def test_submit_without_webhook_or_service_mode_sends_no_config() -> None:
    upstream = answer(envelope_data())
    upstream.provider(base=BASE + "/").submit(SubmitRequest(job_id=JOB_ID, params=dict(VALID)))
    (request,) = upstream.requests
    assert str(request.url) == f"{BASE}/api/v1/task"  # trailing slash of the base dropped
    body = json.loads(request.content)
    assert "config" not in body
    assert body["input"] == VALID


def test_submit_answer_without_task_id_is_permanent() -> None:
    data = envelope_data()
    del data["task_id"]
    with pytest.raises(PermanentUpstreamError, match="task_id"):
        answer(data).provider().submit(SubmitRequest(job_id=JOB_ID, params=dict(VALID)))


# --- envelope parsing -------------------------------------------------------------------


def test_full_completed_envelope() -> None:
    data = envelope_data(
        "completed",
        image_url=GRID,
        image_urls=URLS,
        temporary_image_urls=[u + "?tmp" for u in URLS],
        discord_image_url="https://discord.test/x.png",
        actions=["upscale1"],
        progress=100,
    )
    state = poll_one(answer(data).provider())
    assert state.status is JobStatus.COMPLETED
    assert state.source is Source.POLL
    assert state.progress == 100
    assert state.image_urls == tuple(URLS)
    assert state.upstream_task_id == "t-1"
    assert state.error_code is None
    assert state.error_message is None


def test_payload_is_a_small_redacted_summary() -> None:
    state = poll_one(answer(envelope_data("processing", progress=40)).provider())
    assert state.payload == {"status": "processing", "progress": 40, "task_id": "t-1"}
    assert "echoed-secret" not in json.dumps(state.payload)


def test_failed_envelope_carries_the_providers_message() -> None:
    data = envelope_data("failed")
    data["error"] = {"code": 10000, "raw_message": "raw", "message": "banned prompt"}
    state = poll_one(answer(data).provider())
    assert state.status is JobStatus.FAILED
    assert state.error_code == "upstream_failed"
    assert state.error_message == "banned prompt"


def test_failed_envelope_falls_back_to_raw_message() -> None:
    data = envelope_data("failed")
    data["error"] = {"code": 10000, "raw_message": "raw trouble", "message": "", "detail": None}
    assert poll_one(answer(data).provider()).error_message == "raw trouble"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("pending", JobStatus.SUBMITTED),
        ("Pending", JobStatus.SUBMITTED),
        ("staged", JobStatus.SUBMITTED),
        ("STAGED", JobStatus.SUBMITTED),
        ("processing", JobStatus.PROCESSING),
        ("Processing", JobStatus.PROCESSING),
        ("completed", JobStatus.COMPLETED),
        ("Completed", JobStatus.COMPLETED),
        ("COMPLETED", JobStatus.COMPLETED),
        ("failed", JobStatus.FAILED),
        ("Failed", JobStatus.FAILED),
        (" processing ", JobStatus.PROCESSING),
    ],
)
def test_status_is_case_insensitive(raw: str, status: JobStatus) -> None:
    state = poll_one(answer(envelope_data(raw, image_urls=URLS)).provider())
    assert state.status is status


@pytest.mark.parametrize("raw", ["", "weird", None, 7])
def test_unknown_status_is_never_terminal(raw: Any) -> None:
    data = envelope_data(image_urls=URLS)
    data["status"] = raw
    assert not poll_one(answer(data).provider()).status.is_terminal


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ({"image_urls": URLS, "temporary_image_urls": ["https://t/1"], "image_url": GRID}, URLS),
        ({"image_urls": None, "temporary_image_urls": URLS, "image_url": GRID}, URLS),
        ({"image_urls": [], "temporary_image_urls": URLS, "image_url": GRID}, URLS),
        ({"image_urls": ["", None], "temporary_image_urls": URLS}, URLS),
        ({"image_urls": None, "temporary_image_urls": None, "image_url": GRID}, [GRID]),
        ({"temporary_image_urls": [], "image_url": GRID}, [GRID]),
        ({"image_urls": ["", URLS[0]]}, [URLS[0]]),
        ({"image_urls": None, "temporary_image_urls": None, "image_url": ""}, []),
        ({"image_urls": "https://not-a-list.test"}, []),
    ],
    ids=[
        "image_urls-first",
        "temporary-when-null",
        "temporary-when-empty",
        "temporary-when-only-blanks",
        "grid-last",
        "grid-when-temporary-empty",
        "blanks-dropped",
        "nothing",
        "non-list-ignored",
    ],
)
def test_image_url_fallback_order(output: dict[str, Any], expected: list[str]) -> None:
    data = envelope_data("completed", **{"image_url": "", "image_urls": None, **output})
    assert poll_one(answer(data).provider()).image_urls == tuple(expected)


def test_missing_output_means_no_images_and_no_progress() -> None:
    data = envelope_data("processing")
    data["output"] = None
    state = poll_one(answer(data).provider())
    assert state.image_urls == ()
    assert state.progress is None


@pytest.mark.parametrize(
    ("output", "progress"),
    [
        ({"progress": 42}, 42),
        ({"progress": 55.7}, 55),
        ({"task_progress": 37}, 37),
        ({"progress": 12, "task_progress": 90}, 12),
        ({}, None),
    ],
)
def test_progress_and_task_progress(output: dict[str, Any], progress: int | None) -> None:
    data = envelope_data("processing")
    data["output"] = output
    assert poll_one(answer(data).provider()).progress == progress


def test_non_finite_progress_does_not_crash_the_adapter() -> None:
    # 1e400 is a valid JSON number; Python's json turns it into inf.
    text = json.dumps({"code": 200, "message": "success", "data": envelope_data("processing")})
    text = text.replace('"progress": 0', '"progress": 1e400')
    assert "1e400" in text
    provider = Upstream(lambda _r: httpx.Response(200, text=text)).provider()
    state = poll_one(provider)
    assert state.progress is None or 0 <= state.progress <= 100


# --- errors -----------------------------------------------------------------------------


def test_429_with_retry_after_seconds_is_transient() -> None:
    upstream = Upstream(lambda _r: httpx.Response(429, headers={"Retry-After": "7"}, json={}))
    with pytest.raises(TransientUpstreamError) as info:
        poll_one(upstream.provider())
    assert info.value.retry_after == 7.0
    assert info.value.code == "rate_limited"
    assert "429" in info.value.message


def test_429_with_retry_after_http_date() -> None:
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    upstream = Upstream(lambda _r: httpx.Response(429, headers={"Retry-After": when}))
    with pytest.raises(TransientUpstreamError) as info:
        poll_one(upstream.provider())
    assert info.value.retry_after is not None
    assert 60 < info.value.retry_after <= 120


def test_429_without_retry_after() -> None:
    with pytest.raises(TransientUpstreamError) as info:
        poll_one(Upstream(lambda _r: httpx.Response(429)).provider())
    assert info.value.retry_after is None


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_transient(status: int) -> None:
    upstream = Upstream(lambda _r: httpx.Response(status, json={"code": status, "message": "x"}))
    with pytest.raises(TransientUpstreamError) as info:
        upstream.provider().submit(SubmitRequest(job_id=JOB_ID, params=dict(VALID)))
    assert info.value.code == "upstream_unavailable"
    assert str(status) in info.value.message


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("connection refused"),
        httpx.ConnectTimeout("connect timed out"),
        httpx.ReadTimeout("read timed out"),
        httpx.RemoteProtocolError("server disconnected"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_transport_failures_are_transient(error: Exception) -> None:
    def fail(_request: httpx.Request) -> httpx.Response:
        raise error

    with pytest.raises(TransientUpstreamError) as info:
        poll_one(Upstream(fail).provider())
    assert info.value.message.startswith("piapi:")
    assert KEY not in info.value.message


@pytest.mark.parametrize(
    ("status", "message"),
    [(400, "origin task not found"), (401, "Invalid API key"), (403, "forbidden"), (404, "nope")],
)
def test_client_errors_are_permanent_with_the_providers_message(status: int, message: str) -> None:
    reply = {"code": status, "message": message}
    upstream = Upstream(lambda _r: httpx.Response(status, json=reply))
    with pytest.raises(PermanentUpstreamError) as info:
        upstream.provider().submit(SubmitRequest(job_id=JOB_ID, params=dict(VALID)))
    assert not isinstance(info.value, TransientUpstreamError)
    assert message in info.value.message
    assert str(status) in info.value.message


@pytest.mark.parametrize("status", [400, 401])
def test_client_error_without_a_json_body_is_still_permanent(status: int) -> None:
    # providers.md: "HTTP 400 / 401 / 500 are documented without a body shape" and
    # §4 "Every other 4xx is permanent". A plain-text 401 must not be retried.
    upstream = Upstream(lambda _r: httpx.Response(status, text="Unauthorized"))
    with pytest.raises(PermanentUpstreamError):
        poll_one(upstream.provider())


def test_200_with_a_non_200_code_is_permanent() -> None:
    upstream = Upstream(
        lambda _r: httpx.Response(200, json={"code": 10000, "message": "insufficient quota"})
    )
    with pytest.raises(PermanentUpstreamError) as info:
        upstream.provider().submit(SubmitRequest(job_id=JOB_ID, params=dict(VALID)))
    assert "insufficient quota" in info.value.message
    assert info.value.code == "upstream_rejected"


def test_200_without_a_data_object_is_permanent() -> None:
    upstream = Upstream(lambda _r: httpx.Response(200, json={"code": 200, "data": ["x"]}))
    with pytest.raises(PermanentUpstreamError):
        poll_one(upstream.provider())


@pytest.mark.parametrize("body", ["<html>bad gateway</html>", '{"code": 200, "data": {', ""])
def test_malformed_json_is_transient(body: str) -> None:
    upstream = Upstream(lambda _r: httpx.Response(200, text=body))
    with pytest.raises(TransientUpstreamError, match="not JSON"):
        poll_one(upstream.provider())


@pytest.mark.parametrize("api_key", [None, ""])
def test_missing_api_key_is_not_configured_and_sends_nothing(api_key: str | None) -> None:
    upstream = answer(envelope_data())
    provider = upstream.provider(api_key=api_key)
    with pytest.raises(ProviderNotConfigured) as info:
        provider.submit(SubmitRequest(job_id=JOB_ID, params=dict(VALID)))
    assert info.value.code == "provider_not_configured"
    with pytest.raises(ProviderNotConfigured):
        poll_one(provider)
    assert upstream.requests == []


# --- poll and cancel --------------------------------------------------------------------


def test_poll_gets_each_task() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        task_id = request.url.path.rsplit("/", 1)[1]
        status = "processing" if task_id == "t-1" else "completed"
        return ok(envelope_data(status, task_id=task_id, image_urls=URLS, progress=50))

    upstream = Upstream(handler)
    states = upstream.provider().poll([PollTarget(JOB_ID, "t-1"), PollTarget(JOB_ID, "t-2")])
    assert [(r.method, r.url.path) for r in upstream.requests] == [
        ("GET", "/api/v1/task/t-1"),
        ("GET", "/api/v1/task/t-2"),
    ]
    assert all(r.headers["X-API-Key"] == KEY for r in upstream.requests)
    assert states["t-1"].status is JobStatus.PROCESSING
    assert states["t-1"].progress == 50
    assert states["t-2"].status is JobStatus.COMPLETED
    assert all(s.source is Source.POLL for s in states.values())


def test_cancel_pending_task() -> None:
    upstream = Upstream(
        lambda _r: httpx.Response(200, json={"code": 200, "message": "task t-1 canceled"})
    )
    assert upstream.provider().cancel(PollTarget(JOB_ID, "t-1")) is True
    (request,) = upstream.requests
    assert request.method == "DELETE"
    assert str(request.url) == f"{BASE}/api/v1/task/t-1"
    assert request.headers["X-API-Key"] == KEY


def test_cancel_task_no_longer_pending_returns_false() -> None:
    upstream = Upstream(
        lambda _r: httpx.Response(400, json={"code": 400, "message": "task is not pending"})
    )
    assert upstream.provider().cancel(PollTarget(JOB_ID, "t-1")) is False


def test_cancel_does_not_swallow_transient_errors() -> None:
    upstream = Upstream(lambda _r: httpx.Response(503))
    with pytest.raises(TransientUpstreamError):
        upstream.provider().cancel(PollTarget(JOB_ID, "t-1"))


# --- webhooks ---------------------------------------------------------------------------


def test_parse_webhook_valid_body() -> None:
    provider = answer(envelope_data()).provider()
    data = envelope_data("completed", task_id="t-7", image_urls=URLS, progress=100)
    state = provider.parse_webhook({"timestamp": 1_700_000_000, "data": data})
    assert state.source is Source.WEBHOOK
    assert state.status is JobStatus.COMPLETED
    assert state.upstream_task_id == "t-7"
    assert state.image_urls == tuple(URLS)
    assert state.progress == 100
    assert "echoed-secret" not in json.dumps(state.payload)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"data": envelope_data()}, "timestamp"),
        ({"timestamp": 1}, "data"),
        ({"timestamp": 1, "data": ["t-1"]}, "data.task_id"),
        ({"timestamp": 1, "data": "t-1"}, "data.task_id"),
        ({"timestamp": 1, "data": {"status": "completed"}}, "data.task_id"),
        ({"timestamp": 1, "data": {"task_id": 123, "status": "completed"}}, "data.task_id"),
        ([{"timestamp": 1, "data": envelope_data()}], "timestamp"),
        ("not an object", "timestamp"),
        (None, "timestamp"),
    ],
    ids=[
        "no-timestamp",
        "no-data",
        "data-list",
        "data-string",
        "no-task-id",
        "task-id-int",
        "body-list",
        "body-string",
        "body-null",
    ],
)
def test_parse_webhook_rejects_malformed_bodies(body: Any, field: str) -> None:
    provider = answer(envelope_data()).provider()
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        provider.parse_webhook(body)


@pytest.mark.parametrize("task_id", [""])
def test_parse_webhook_rejects_a_blank_task_id(task_id: str) -> None:
    # An empty task id cannot identify a task; the global endpoint would otherwise
    # look it up as "upstream_task_id IS NULL" (see test_webhook_views.py).
    provider = answer(envelope_data()).provider()
    with pytest.raises(ValueError, match="task_id"):
        provider.parse_webhook({"timestamp": 1, "data": envelope_data(task_id=task_id)})


# --- validate ---------------------------------------------------------------------------


def validate(**params: Any) -> dict[str, Any]:
    return answer(envelope_data()).provider().validate(params)


def test_validate_minimal_and_full() -> None:
    assert validate(**VALID) == VALID
    full = {
        **VALID,
        "aspect_ratio": "16:9",
        "skip_prompt_check": True,
        "service_mode": "",
    }
    assert validate(**full) == full


def test_validate_strips_strings_and_does_not_mutate_input() -> None:
    params = {"origin_task_id": "  o-1 ", "index": "2", "prompt": " a cat\n"}
    snapshot = dict(params)
    assert validate(**params) == {"origin_task_id": "o-1", "index": "2", "prompt": "a cat"}
    assert params == snapshot


@pytest.mark.parametrize("index", INDEXES)
def test_validate_accepts_every_documented_index(index: str) -> None:
    assert validate(**{**VALID, "index": index})["index"] == index


@pytest.mark.parametrize(("given", "stored"), [(1, "1"), (2, "2"), (3, "3"), (4, "4")])
def test_validate_turns_int_index_into_string(given: int, stored: str) -> None:
    assert validate(**{**VALID, "index": given})["index"] == stored


@pytest.mark.parametrize("service_mode", ["", "public", "private"])
def test_validate_accepts_service_modes(service_mode: str) -> None:
    assert validate(**VALID, service_mode=service_mode)["service_mode"] == service_mode


@pytest.mark.parametrize("ratio", ["1:1", "16:9", "9:16", "21:9", "4:3", "100:1"])
def test_validate_accepts_aspect_ratios(ratio: str) -> None:
    assert validate(**VALID, aspect_ratio=ratio)["aspect_ratio"] == ratio


BAD_PARAMS = [
    ({"index": "1", "prompt": "p"}, "origin_task_id"),
    ({**VALID, "origin_task_id": ""}, "origin_task_id"),
    ({**VALID, "origin_task_id": "   "}, "origin_task_id"),
    ({**VALID, "origin_task_id": 42}, "origin_task_id"),
    ({**VALID, "origin_task_id": None}, "origin_task_id"),
    ({"origin_task_id": "o", "prompt": "p"}, "index"),
    ({**VALID, "index": "5"}, "index"),
    ({**VALID, "index": 5}, "index"),
    ({**VALID, "index": 0}, "index"),
    ({**VALID, "index": True}, "index"),
    ({**VALID, "index": 1.0}, "index"),
    ({**VALID, "index": "U1"}, "index"),
    ({**VALID, "index": " 1"}, "index"),
    ({**VALID, "index": "HIGH_VARIATION"}, "index"),
    ({**VALID, "index": None}, "index"),
    ({"origin_task_id": "o", "index": "1"}, "prompt"),
    ({**VALID, "prompt": ""}, "prompt"),
    ({**VALID, "prompt": "\n\t "}, "prompt"),
    ({**VALID, "prompt": ["a", "cat"]}, "prompt"),
    ({**VALID, "aspect_ratio": "16x9"}, "aspect_ratio"),
    ({**VALID, "aspect_ratio": "16:9:1"}, "aspect_ratio"),
    ({**VALID, "aspect_ratio": ":9"}, "aspect_ratio"),
    ({**VALID, "aspect_ratio": "1000:1"}, "aspect_ratio"),
    ({**VALID, "aspect_ratio": " 16:9"}, "aspect_ratio"),
    ({**VALID, "aspect_ratio": ""}, "aspect_ratio"),
    ({**VALID, "aspect_ratio": 1.77}, "aspect_ratio"),
    ({**VALID, "aspect_ratio": None}, "aspect_ratio"),
    ({**VALID, "skip_prompt_check": "true"}, "skip_prompt_check"),
    ({**VALID, "skip_prompt_check": 1}, "skip_prompt_check"),
    ({**VALID, "skip_prompt_check": None}, "skip_prompt_check"),
    ({**VALID, "service_mode": "vip"}, "service_mode"),
    ({**VALID, "service_mode": None}, "service_mode"),
    ({**VALID, "service_mode": ["public"]}, "service_mode"),
    ({**VALID, "seed": 42}, "seed"),
    ({**VALID, "model": "midjourney"}, "model"),
    ({**VALID, "webhook_config": {}}, "webhook_config"),
]


@pytest.mark.parametrize(("params", "field"), BAD_PARAMS)
def test_validate_rejects_naming_the_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError) as info:
        validate(**params)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


def test_validate_rejects_trailing_newline_in_aspect_ratio() -> None:
    # `$` in _ASPECT_RATIO also matches before a trailing newline, so "16:9\n"
    # passes the format check and is sent to PiAPI as is.
    with pytest.raises(ValueError, match=r"^aspect_ratio:"):
        validate(**VALID, aspect_ratio="16:9\n")


def test_validate_rejects_an_input_image() -> None:
    provider = answer(envelope_data()).provider()
    with pytest.raises(ValueError, match=r"^image:"):
        provider.validate({**VALID, "image_url": "https://img.test/in.png"})
    with pytest.raises(ValueError, match=r"^image:"):
        provider.validate(VALID, InputImage(b"\x89PNG\r\n\x1a\n", "in.png"))


def test_validate_unknown_parameter_is_named_before_anything_else() -> None:
    with pytest.raises(ValueError) as info:
        validate(zzz=1, aaa_unknown=2)
    message = str(info.value)
    assert message.startswith("aaa_unknown:")
    assert "not a piapi parameter" in message
    assert "origin_task_id" in message  # lists what is allowed
