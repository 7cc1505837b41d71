"""Result images variflow stores itself (inline provider results, archived copies)."""

from __future__ import annotations

import uuid

from flask import Blueprint, abort, send_from_directory
from flask.typing import ResponseReturnValue

from webhooks.context import runtime

bp = Blueprint("results", __name__, url_prefix="/results")


@bp.get("/<job_id>/<name>")
def result_image(job_id: str, name: str) -> ResponseReturnValue:
    if name.startswith("."):
        abort(404)  # a file being written (".1.png.tmp"): never served half-written
    try:
        folder = runtime().settings.results_folder / str(uuid.UUID(job_id))
    except ValueError:
        abort(404)
    # send_from_directory refuses names that escape the folder, and types the
    # file by its extension (archives keep png, jpg or webp as the provider sent).
    return send_from_directory(folder, name, max_age=3600)
