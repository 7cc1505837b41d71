"""Introspection and control endpoints under ``/_sandbox`` (no auth), plus ``/files``.

``POST /_sandbox/reset`` forgets tasks, files, counters and pending webhooks
and restores the knobs the app was created with, unless the JSON body says
``{"keep_config": true}``.
"""

from __future__ import annotations

import dataclasses

from flask import Blueprint, Response, request

from sandbox.context import current_state
from sandbox.errors import json_response

admin_bp = Blueprint("sandbox_admin", __name__, url_prefix="/_sandbox")
files_bp = Blueprint("sandbox_files", __name__)


@admin_bp.get("/config")
def get_config() -> Response:
    return json_response(current_state().config.to_dict())


@admin_bp.post("/config")
def update_config() -> Response:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return json_response({"error": "body must be a JSON object of knobs"}, 400)
    try:
        config = current_state().update_config(**body)
    except KeyError as exc:
        return json_response({"error": f"unknown knob: {exc.args[0]}"}, 400)
    except ValueError as exc:
        return json_response({"error": str(exc)}, 400)
    return json_response(config.to_dict())


@admin_bp.get("/stats")
def get_stats() -> Response:
    return json_response(current_state().stats())


@admin_bp.get("/tasks")
def get_tasks() -> Response:
    return json_response({"tasks": [dataclasses.asdict(t) for t in current_state().tasks()]})


@admin_bp.get("/webhooks")
def get_webhook_attempts() -> Response:
    attempts = current_state().webhook_attempts()
    return json_response({"attempts": [dataclasses.asdict(a) for a in attempts]})


@admin_bp.post("/reset")
def reset() -> Response:
    body = request.get_json(silent=True) or {}
    keep = bool(body.get("keep_config", False)) if isinstance(body, dict) else False
    current_state().reset(keep_config=keep)
    return json_response({"ok": True})


@files_bp.get("/files/<name>.png")
def get_file(name: str) -> Response:
    data = current_state().images.get(f"{name}.png")
    if data is None:
        return json_response({"error": "file not found"}, 404)
    return Response(data, mimetype="image/png")
