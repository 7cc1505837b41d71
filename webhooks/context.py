"""How a blueprint reaches the app's runtime (settings, database, adapters)."""

from __future__ import annotations

import os
import threading

from flask import current_app

from worker import runtime as runtimes
from worker.runtime import Runtime

EXTENSION_KEY = "variflow"
_lock = threading.Lock()


def runtime() -> Runtime:
    """The app's runtime, for this process: a forked worker (gunicorn --preload) gets
    its own engine and HTTP client, built again from the same settings."""
    found: Runtime = current_app.extensions[EXTENSION_KEY]
    if found.pid == os.getpid():
        return found
    with _lock:
        found = current_app.extensions[EXTENSION_KEY]
        if found.pid != os.getpid():
            installed = runtimes.installed()
            if installed is not None and installed.settings is found.settings:
                found = runtimes.current()
            else:
                found = Runtime.build(found.settings, consumers=found.consumers)
            current_app.extensions[EXTENSION_KEY] = found
    return found
