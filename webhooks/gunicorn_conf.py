"""gunicorn settings for the webhook app: ``gunicorn --config python:webhooks.gunicorn_conf``.

Metrics are shared between gunicorn's workers through files (see
worker/metrics.py); when a worker exits, the master drops its live-gauge files.
"""

from __future__ import annotations

from typing import Any


def child_exit(server: Any, worker: Any) -> None:
    from worker.metrics import mark_process_dead

    mark_process_dead(worker.pid)
