"""How a blueprint reaches the app's runtime (settings, database, adapters)."""

from __future__ import annotations

from flask import current_app

from worker.runtime import Runtime

EXTENSION_KEY = "variflow"


def runtime() -> Runtime:
    found: Runtime = current_app.extensions[EXTENSION_KEY]
    return found
