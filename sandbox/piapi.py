"""PiAPI Midjourney variation endpoints (docs/providers.md, PiAPI), under ``/piapi``.

Choices where the contract is silent:

- Validation errors answer HTTP 400 ``{"code": 400, "message": "<field>: <rule>"}``;
  a body that is not a JSON object answers the same with ``message`` "body: ...".
- The webhook endpoint may be ``http://`` (the real service demands public
  HTTPS; locally that cannot be had).
- Capacity per key (knobs ``piapi_max_concurrent``, ``piapi_daily_failed_allowance``;
  sandbox/capacity.py): a task created while the key's slots are all taken is
  ``staged`` (usage frozen, no ``started_at``) and becomes ``pending`` the
  moment a slot frees, first in first out per key; its webhooks are ``staged``
  at creation, then the usual ones from that moment. Once the key's tasks that
  failed this UTC day (cancelled ones excepted) reach the allowance, a create
  answers HTTP 403 ``{"code": 403, "message": "daily limit of incorrect tasks
  reached: ... no more tasks until <next 00:00 UTC>"}`` and creates nothing.
  PiAPI documents the consequence ("no more tasks allowed for the day"), not
  the answer: a refusal for the rest of the day is not a rate limit, so not a
  429 that invites a retry every few seconds until midnight.
- Cancel works only while the task is staged or pending. Afterwards the task reads as
  ``status: "failed"`` with ``error.message == "task canceled by user"`` and,
  if it has a webhook, one ``failed`` delivery is sent. PiAPI documents no
  "cancelled" status, so the sandbox does not invent one.
- Cancelling a task that is neither staged nor pending answers HTTP 400
  ``{"code": 400, "message": "task <id> is not pending"}``; an unknown task id
  answers HTTP 404 ``{"code": 404, "message": "task not found"}`` (GET too).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, request

from sandbox import fault_hooks
from sandbox.capacity import CapacityRefused
from sandbox.context import current_state
from sandbox.errors import json_response, piapi_error
from sandbox.piapi_envelope import envelope
from sandbox.state import NewTask

bp = Blueprint("piapi", __name__, url_prefix="/piapi")
fault_hooks.install(bp, "piapi")

INDEXES = ("1", "2", "3", "4", "high_variation", "low_variation")
SERVICE_MODES = ("", "public", "private")
_ASPECT_RATIO = re.compile(r"^\d+:\d+$")


@bp.before_request
def require_api_key() -> Response | None:
    key = request.headers.get("X-API-Key", "")
    if key not in current_state().config.api_keys:
        return piapi_error(401, "Unauthorized: missing or invalid X-API-Key")
    return None


def _is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _validate_input(given: object) -> str | None:
    if not isinstance(given, dict):
        return "input: required object"
    origin = given.get("origin_task_id")
    if not isinstance(origin, str) or not origin.strip():
        return "input.origin_task_id: required non-empty string"
    if given.get("index") not in INDEXES:
        return "input.index: must be one of " + ", ".join(INDEXES)
    prompt = given.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return "input.prompt: required non-empty string"
    aspect_ratio = given.get("aspect_ratio")
    if aspect_ratio is not None and (
        not isinstance(aspect_ratio, str) or not _ASPECT_RATIO.match(aspect_ratio)
    ):
        return "input.aspect_ratio: must look like '1:1'"
    skip = given.get("skip_prompt_check")
    if skip is not None and not isinstance(skip, bool):
        return "input.skip_prompt_check: must be a boolean"
    return None


def _validate_config(given: object) -> str | None:
    if given is None:
        return None
    if not isinstance(given, dict):
        return "config: must be an object"
    if given.get("service_mode", "") not in SERVICE_MODES:
        return "config.service_mode: must be '', 'public' or 'private'"
    webhook = given.get("webhook_config")
    if webhook is None:
        return None
    if not isinstance(webhook, dict):
        return "config.webhook_config: must be an object"
    endpoint = webhook.get("endpoint", "")
    if not isinstance(endpoint, str) or (endpoint and not _is_http_url(endpoint)):
        return "config.webhook_config.endpoint: must be an http(s) URL"
    secret = webhook.get("secret", "")
    if not isinstance(secret, str):
        return "config.webhook_config.secret: must be a string"
    return None


def validate(body: dict[str, Any]) -> str | None:
    """The first problem with a create body, naming the field, or None."""
    if body.get("model") != "midjourney":
        return "model: must be 'midjourney'"
    if body.get("task_type") != "variation":
        return "task_type: must be 'variation'"
    return _validate_input(body.get("input")) or _validate_config(body.get("config"))


def correlation_of(body: dict[str, Any]) -> str:
    """Last path segment of the webhook endpoint (the job id), else the prompt."""
    webhook = (body.get("config") or {}).get("webhook_config") or {}
    endpoint = webhook.get("endpoint") or ""
    if endpoint:
        segment = urlsplit(endpoint).path.rstrip("/").rsplit("/", 1)[-1]
        if segment:
            return str(segment)
    return str(body["input"]["prompt"])


@bp.post("/api/v1/task")
def create_task() -> Response:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return piapi_error(400, "body: must be a JSON object")
    problem = validate(body)
    if problem:
        return piapi_error(400, problem)
    state = current_state()
    config = state.config
    webhook = (body.get("config") or {}).get("webhook_config") or {}
    try:
        task = state.create_task(
            NewTask(
                provider="piapi",
                correlation=correlation_of(body),
                request={"input": body["input"], "config": body.get("config") or {}},
                public_base=request.host_url.rstrip("/"),
                result_count=config.images_per_task,
                image_size=config.image_size,
                with_grid=True,
                webhook_endpoint=webhook.get("endpoint") or None,
                webhook_secret=webhook.get("secret") or None,
                api_key=request.headers.get("X-API-Key", ""),
            )
        )
    except CapacityRefused as refused:
        return piapi_error(403, refused.message)
    found = state.lookup("piapi", task.task_id)
    assert found is not None
    return json_response(envelope(*found))


@bp.get("/api/v1/task/<task_id>")
def get_task(task_id: str) -> Response:
    found = current_state().lookup("piapi", task_id)
    if found is None:
        return piapi_error(404, "task not found")
    return json_response(envelope(*found))


@bp.delete("/api/v1/task/<task_id>")
def cancel_task(task_id: str) -> Response:
    result = current_state().cancel("piapi", task_id)
    if result == "not_found":
        return piapi_error(404, "task not found")
    if result == "not_pending":
        return piapi_error(400, f"task {task_id} is not pending")
    return json_response({"code": 200, "message": f"task {task_id} canceled"})
