"""LemonData OpenAI-compatible image variations (see docs/providers.md), under ``/lemondata``.

Choices where the contract is silent:

- Knob ``lemondata_mode``: ``sync`` holds the request until the task is done
  (pending + processing seconds), ``async`` answers at once with a
  ``poll_url``, ``mixed`` picks one of the two per request.
- A sync request whose task was decided to fail answers HTTP 400 with code
  ``generation_failed``: a 5xx would invite a blind retry of a create.
- Validation errors: HTTP 400, type ``invalid_request_error``, ``param`` names
  the field, ``code`` is ``missing_required_parameter``, ``invalid_value``,
  ``invalid_image_format`` or ``invalid_image_dimensions``; an image over
  ``lemondata_max_image_bytes`` answers HTTP 413 with code ``file_too_large``.
- Auth: no ``Authorization: Bearer`` header → 401 ``invalid_request_error``;
  an unknown key → 401 ``authentication_error``; both with code
  ``invalid_api_key``.
- While a polled task is not finished, ``data`` is ``[{"url": ""}]`` as in the
  async create answer; a failed task has ``data: []`` and ``error``.
- Unknown form fields are ignored.
- Rate limit per key (knob ``lemondata_requests_per_minute``;
  sandbox/capacity.py): every authenticated request counts, creates and polls
  alike, in a sliding 60-second window; requests refused by it are not
  counted, nor are those answered by an injected fault (they are answered
  before the key is read). Beyond the limit: HTTP 429 with ``Retry-After``
  (whole seconds until a request would be accepted) and the body of
  LemonData's guide (type ``rate_limit_error``, code ``rate_limit_exceeded``,
  as the injected 429s). Every answer to a limited key carries
  ``X-RateLimit-Limit``, ``X-RateLimit-Remaining`` (after this request) and
  ``X-RateLimit-Reset`` (Unix time the window next has room). Keys without a
  limit get none of these headers.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from flask import Blueprint, Response, g, request
from PIL import Image

from sandbox import fault_hooks
from sandbox.context import current_state
from sandbox.errors import json_response, lemondata_error
from sandbox.state import NewTask
from sandbox.tasks import Task, TaskView

bp = Blueprint("lemondata", __name__, url_prefix="/lemondata")
fault_hooks.install(bp, "lemondata")

MODELS = ("dall-e-2",)
SIZES = ("256x256", "512x512", "1024x1024")
RESPONSE_FORMATS = ("url", "b64_json")
MAX_N = 10
NOT_FOUND_BODY = {
    "error": {
        "message": "Task not found or no longer available.",
        "type": "invalid_request_error",
        "code": "async_task_not_found",
    }
}


class _Invalid(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__()
        self.response = response


def _invalid(param: str, message: str, code: str = "invalid_value", status: int = 400) -> _Invalid:
    return _Invalid(lemondata_error(status, message, code=code, param=param))


def _api_key() -> str:
    return request.headers.get("Authorization", "").partition(" ")[2].strip()


@bp.before_request
def require_api_key() -> Response | None:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return lemondata_error(
            401,
            "You didn't provide an API key. Use 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )
    if key.strip() not in current_state().config.api_keys:
        return lemondata_error(
            401, "Incorrect API key provided.", type_="authentication_error", code="invalid_api_key"
        )
    return None


# Registered after require_api_key, so it only ever sees known keys.
@bp.before_request
def enforce_rate_limit() -> Response | None:
    verdict = current_state().count_request("lemondata", _api_key())
    if verdict is None:
        return None
    g.sandbox_rate_headers = verdict.headers()
    if verdict.allowed:
        return None
    return lemondata_error(
        429,
        "Rate limit exceeded. Please retry later.",
        type_="rate_limit_error",
        code="rate_limit_exceeded",
        extra={"retryable": True, "retry_after": verdict.retry_after},
    )


@bp.after_request
def add_rate_headers(response: Response) -> Response:
    headers: dict[str, str] = g.pop("sandbox_rate_headers", {})
    for name, value in headers.items():
        response.headers[name] = value
    return response


def _check_image(data: bytes, limit: int) -> None:
    if len(data) > limit:
        raise _invalid(
            "image",
            f"Uploaded image must be at most {limit} bytes.",
            code="file_too_large",
            status=413,
        )
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            width, height = image.size
            image.verify()
    except Exception as exc:
        raise _invalid(
            "image", "Uploaded image must be a valid PNG.", "invalid_image_format"
        ) from exc
    if image_format != "PNG":
        raise _invalid("image", "Uploaded image must be a valid PNG.", "invalid_image_format")
    if width != height:
        raise _invalid("image", "Uploaded image must be square.", "invalid_image_dimensions")


def _choice(name: str, allowed: tuple[str, ...], default: str) -> str:
    value = request.form.get(name) or default
    if value not in allowed:
        raise _invalid(name, f"'{value}' is not one of {list(allowed)} - '{name}'")
    return value


def _parse_n() -> int:
    raw = request.form.get("n") or "1"
    if not raw.strip().isdigit() or not 1 <= int(raw) <= MAX_N:
        raise _invalid("n", f"'{raw}' is not a valid n: expected an integer from 1 to {MAX_N}")
    return int(raw)


def _parse_form() -> tuple[bytes, dict[str, Any]]:
    if not request.mimetype.startswith("multipart/form-data"):
        raise _invalid("image", "Expected a multipart/form-data body.", "invalid_content_type")
    upload = request.files.get("image")
    if upload is None:
        raise _invalid(
            "image", "Missing required parameter: 'image'.", "missing_required_parameter"
        )
    data = upload.read()
    _check_image(data, current_state().config.lemondata_max_image_bytes)
    fields: dict[str, Any] = {
        "model": _choice("model", MODELS, "dall-e-2"),
        "n": _parse_n(),
        "size": _choice("size", SIZES, "1024x1024"),
        "response_format": _choice("response_format", RESPONSE_FORMATS, "url"),
        "user": request.form.get("user", ""),
        "image_bytes": len(data),
    }
    return data, fields


def _images(task: Task) -> list[dict[str, str]]:
    if task.extra["response_format"] == "b64_json":
        state = current_state()
        return [
            {"b64_json": base64.b64encode(state.images.get(name) or b"").decode()}
            for name in task.result_files
        ]
    return [{"url": url} for url in task.result_urls]


def _task_body(task: Task, view: TaskView) -> dict[str, Any]:
    body: dict[str, Any] = {
        "created": int(task.created_at),
        "task_id": task.task_id,
        "status": view.status,
    }
    if view.status == "completed":
        body["data"] = _images(task)
    elif view.status == "failed":
        body["data"] = []
        body["error"] = view.error_message
    else:
        body["data"] = [{"url": ""}]
    return body


@bp.post("/v1/images/variations")
def create_variation() -> Response:
    try:
        _, fields = _parse_form()
    except _Invalid as invalid:
        return invalid.response
    state = current_state()
    sync = state.choose_lemondata_sync()
    side = int(fields["size"].split("x")[0])
    task = state.create_task(
        NewTask(
            provider="lemondata",
            correlation=fields["user"],
            request=fields,
            public_base=request.host_url.rstrip("/"),
            result_count=fields["n"],
            image_size=side,
            extra={"response_format": fields["response_format"], "sync": sync},
            api_key=_api_key(),
        )
    )
    if not sync:
        return json_response(
            {
                "created": int(task.created_at),
                "task_id": task.task_id,
                "status": "pending",
                "poll_url": f"/v1/images/generations/{task.task_id}",
                "data": [{"url": ""}],
            }
        )
    # Some LemonData routes answer only when the images exist; emulate that wait.
    end = task.end_mono
    assert end is not None  # LemonData stages nothing: the task started at creation
    state.clock.sleep(max(0.0, end - state.clock.monotonic()))
    found = state.lookup("lemondata", task.task_id)
    assert found is not None
    _, view = found
    if view.status != "completed":
        return lemondata_error(400, view.error_message, code="generation_failed")
    return json_response({"created": int(task.created_at), "data": _images(task)})


@bp.get("/v1/images/generations/<task_id>")
@bp.get("/v1/tasks/<task_id>")
def poll(task_id: str) -> Response:
    found = current_state().lookup("lemondata", task_id)
    if found is None:
        return json_response(NOT_FOUND_BODY, 404)
    return json_response(_task_body(*found))
