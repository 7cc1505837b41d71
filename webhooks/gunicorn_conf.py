"""gunicorn settings for the web app: ``gunicorn --config python:webhooks.gunicorn_conf``.

Metrics are shared between gunicorn's workers through files (see
worker/metrics.py); when a worker exits, the master drops its live-gauge files.
The master reads the settings once, when it starts, to know the folder.
"""

from __future__ import annotations

from typing import Any

from worker import metrics
from worker.config import get_settings


def on_starting(server: Any) -> None:
    settings = get_settings()
    metrics.configure(settings.metrics_folder, settings.provider_names)


def child_exit(server: Any, worker: Any) -> None:
    metrics.mark_process_dead(worker.pid)
