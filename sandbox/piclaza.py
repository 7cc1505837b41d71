"""Piclaza image-variation endpoints (docs/providers.md, Piclaza), under ``/piclaza``.

Choices where the contract is silent:

- Invalid create or query bodies answer HTTP 400 ``{"code": 400, "message": ...}``.
- Task status in query results: ``queued`` (pending), ``running``
  (processing), ``ok`` (completed), ``failed``. A failed item keeps
  ``code: 0`` and carries the reason in ``message``.
- Completed items add ``image_urls`` (list) and ``image_url`` (first one);
  other items do not carry these fields at all.
- An unknown task id comes back as ``{"code": 404, "message": "task not
  found", "task_id": ...}`` inside an HTTP 200 answer.
- One query accepts 1..100 ids; more is a 400.
- ``reference`` is the input ``image_url``, empty for an uploaded image.
- Capacity per key (knob ``piclaza_max_concurrent``; sandbox/capacity.py): a
  create while the key already runs that many unfinished tasks answers HTTP
  200 ``{"code": 429, "message": "concurrency limit exceeded: ..."}`` and
  creates nothing. Piclaza documents no limits; over capacity shows as an HTTP
  429 or as a non-zero ``code`` whose message mentions a limit. The sandbox
  emulates the second, harder form: an HTTP 429 is plainly transient, a
  non-zero code in a 200 answer has to be read to be told from a rejection.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import uuid
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, request
from PIL import Image

from sandbox import fault_hooks
from sandbox.capacity import CapacityRefused, key_fingerprint
from sandbox.context import current_state
from sandbox.errors import json_response, piclaza_error
from sandbox.piapi_envelope import iso_time
from sandbox.state import NewTask
from sandbox.tasks import Task, TaskView

bp = Blueprint("piclaza", __name__, url_prefix="/piclaza")
fault_hooks.install(bp, "piclaza")

TASK_TYPE = "image_variation"
SOURCES = ("unknown", "api", "web", "ext")
MAX_QUERY_IDS = 100
_DATA_URI = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,(?P<payload>.+)$", re.DOTALL)
# Piclaza stages nothing (it refuses instead); "staged" is mapped for completeness.
_STATUS = {
    "staged": "queued",
    "pending": "queued",
    "processing": "running",
    "completed": "ok",
    "failed": "failed",
}


@bp.before_request
def require_api_key() -> Response | None:
    key = request.headers.get("X-API-Key", "")
    if key not in current_state().config.api_keys:
        return piclaza_error(401, "invalid or missing X-API-Key")
    return None


def _api_key() -> str:
    return request.headers.get("X-API-Key", "")


def _user_id() -> str:
    return "user_" + key_fingerprint(_api_key())


def _decode_data_uri(value: str) -> bytes | None:
    match = _DATA_URI.match(value)
    if match is None:
        return None
    try:
        data = base64.b64decode(match["payload"], validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception:
        return None
    return data


def validate(body: dict[str, Any]) -> str | None:
    image_url = body.get("image_url") or None
    image_b64 = body.get("image_file_b64") or None
    if (image_url is None) == (image_b64 is None):
        return "exactly one of image_url or image_file_b64 is required"
    if image_url is not None:
        parts = urlsplit(image_url) if isinstance(image_url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            return "image_url: must be an http(s) URL"
    else:
        if not isinstance(image_b64, str) or _decode_data_uri(image_b64) is None:
            return "image_file_b64: must be a data:image/...;base64, URI of a valid image"
        name = body.get("image_name")
        if not isinstance(name, str) or not name.strip():
            return "image_name: required with image_file_b64"
    if "grouping" in body and not isinstance(body["grouping"], bool):
        return "grouping: must be a boolean"
    if "title" in body and not isinstance(body["title"], str):
        return "title: must be a string"
    if "source" in body and body["source"] not in SOURCES:
        return "source: must be one of " + ", ".join(SOURCES)
    return None


@bp.post("/task/v1/image/vary")
def create_task() -> Response:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return piclaza_error(400, "request body must be a JSON object")
    problem = validate(body)
    if problem:
        return piclaza_error(400, problem)
    state = current_state()
    config = state.config
    stored = dict(body)
    if stored.get("image_file_b64"):
        # Kept out of /_sandbox/tasks: only its length matters there.
        stored["image_file_b64"] = f"<{len(stored['image_file_b64'])} characters>"
    source = body.get("source") or "api"
    try:
        task = state.create_task(
            NewTask(
                provider="piclaza",
                correlation=body.get("title") or "",
                request=stored,
                public_base=request.host_url.rstrip("/"),
                result_count=config.images_per_task,
                image_size=config.image_size,
                extra={
                    "group_id": str(uuid.uuid4()),
                    "request_id": str(uuid.uuid4()),
                    "user_id": _user_id(),
                    "source": source,
                    "reference": body.get("image_url") or "",
                },
                api_key=_api_key(),
            )
        )
    except CapacityRefused as refused:
        return piclaza_error(429, refused.message, http_status=200)
    created = iso_time(task.created_at)
    group = {
        "group_id": task.extra["group_id"],
        "user_id": task.extra["user_id"],
        "type": TASK_TYPE,
        "source": source,
        "status": "queued",
        "title": body.get("title") or "",
        "cover_image_url": "",
        "cover_video_url": "",
        "task_ids": [task.task_id],
        "task_count": 1,
        "meta": {},
        "created_at": created,
        "updated_at": created,
    }
    result = {"code": 0, "message": "", "task_id": task.task_id, "type": TASK_TYPE}
    return json_response({"code": 0, "message": "", "data": {"results": [result], "group": group}})


def _item(task: Task, view: TaskView) -> dict[str, Any]:
    item: dict[str, Any] = {
        "code": 0,
        "message": view.error_message if view.status == "failed" else "",
        "task_id": task.task_id,
        "request_id": task.extra["request_id"],
        "user_id": task.extra["user_id"],
        "type": TASK_TYPE,
        "status": _STATUS[view.status],
        "reference": task.extra["reference"],
        "sketch": "",
        "prompt": "",
        "prompt_display": "",
        "negative_prompt": "",
    }
    if view.status == "completed":
        urls = task.result_urls
        item["image_urls"] = urls
        item["image_url"] = urls[0] if urls else ""
    return item


@bp.post("/task/v1/image/vary/result")
def query_tasks() -> Response:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return piclaza_error(400, "request body must be a JSON object")
    ids = body.get("task_ids")
    if not isinstance(ids, list) or not ids:
        return piclaza_error(400, "task_ids: required non-empty list")
    if len(ids) > MAX_QUERY_IDS:
        return piclaza_error(400, f"task_ids: at most {MAX_QUERY_IDS} ids per query")
    if not all(isinstance(task_id, str) and task_id for task_id in ids):
        return piclaza_error(400, "task_ids: every id must be a non-empty string")
    state = current_state()
    state.record_batch_query(len(ids))
    results: list[dict[str, Any]] = []
    for task_id in ids:
        found = state.lookup("piclaza", task_id)
        if found is None:
            results.append({"code": 404, "message": "task not found", "task_id": task_id})
        else:
            results.append(_item(*found))
    return json_response({"code": 0, "message": "", "data": {"results": results}})
