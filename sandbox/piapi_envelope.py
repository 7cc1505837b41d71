"""PiAPI's unified task envelope, built from a task and one view of it.

Shared by the HTTP answers and the webhook bodies, which carry the same object
as the envelope's ``data``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sandbox.tasks import Task, TaskView

# PiAPI's backend is written in Go and prints unset timestamps as Go's zero
# time rather than null or an empty string; clients must cope with that.
GO_ZERO_TIME = "0001-01-01T00:00:00Z"
TASK_POINTS = 700_000
FAILED_ERROR_CODE = 10000
MIDJOURNEY_ACTIONS = [
    "reroll",
    "upscale1",
    "upscale2",
    "upscale3",
    "upscale4",
    "variation1",
    "variation2",
    "variation3",
    "variation4",
]


def iso_time(timestamp: float | None) -> str:
    if timestamp is None:
        return GO_ZERO_TIME
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def _task_config(task: Task) -> dict[str, Any]:
    given = task.request.get("config") or {}
    webhook = given.get("webhook_config") or {}
    return {
        "service_mode": given.get("service_mode") or "public",
        # The secret is echoed as given, like the documented envelope shows it:
        # whoever stores these payloads must redact it.
        "webhook_config": {
            "endpoint": webhook.get("endpoint") or "",
            "secret": webhook.get("secret") or "",
        },
    }


def _output(task: Task, view: TaskView) -> dict[str, Any]:
    completed = view.status == "completed"
    urls = task.result_urls if completed else None
    return {
        "image_url": task.grid_url if completed else "",
        "image_urls": urls,
        "temporary_image_urls": list(urls) if urls is not None else None,
        "discord_image_url": "",
        "actions": list(MIDJOURNEY_ACTIONS) if completed else [],
        "progress": view.progress,
        "intermediate_image_urls": None,
    }


def _usage(view: TaskView) -> dict[str, Any]:
    # Points are frozen from submission (staged included) and consumed on success.
    if view.status in ("staged", "pending", "processing"):
        return {"type": "point", "frozen": TASK_POINTS, "consume": 0}
    if view.status == "completed":
        return {"type": "point", "frozen": 0, "consume": TASK_POINTS}
    return {"type": "point", "frozen": 0, "consume": 0}


def _error(view: TaskView) -> dict[str, Any]:
    if view.status != "failed":
        return {"code": 0, "raw_message": "", "message": "", "detail": None}
    return {
        "code": FAILED_ERROR_CODE,
        "raw_message": view.error_message,
        "message": view.error_message,
        "detail": None,
    }


def envelope_data(task: Task, view: TaskView) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "model": "midjourney",
        "task_type": "variation",
        "status": view.status,
        "config": _task_config(task),
        "input": dict(task.request.get("input") or {}),
        "output": _output(task, view),
        "meta": {
            "created_at": iso_time(task.created_at),
            "started_at": iso_time(view.started_at),
            "ended_at": iso_time(view.ended_at),
            "usage": _usage(view),
        },
        "detail": None,
        "logs": [],
        "error": _error(view),
    }


def envelope(task: Task, view: TaskView) -> dict[str, Any]:
    return {"code": 200, "message": "success", "data": envelope_data(task, view)}
