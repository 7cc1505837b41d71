"""gunicorn settings for the web app: ``gunicorn --config python:webhooks.gunicorn_conf``.

Metrics are shared between gunicorn's workers through files in the web app's
scope of the host's metrics folder (see worker/metrics.py), which the master
empties when it starts; when a worker exits, the master drops its live-gauge
files. The master reads the settings once, when it starts, to know the folder.
"""

from __future__ import annotations

from typing import Any

from worker import metrics
from worker.config import get_settings


def on_starting(server: Any) -> None:
    settings = get_settings()
    metrics.start_scope(settings.metrics_folder, metrics.WEB_SCOPE, settings.provider_names)


def child_exit(server: Any, worker: Any) -> None:
    metrics.mark_process_dead(worker.pid)
