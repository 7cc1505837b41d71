"""The web app: provider webhooks, health, metrics, results and the dashboard.

:func:`create_app` is the web process's entry point: it builds the process's
runtime from the settings it is given (or reads them once) and registers one
blueprint per concern. The blueprints reach the runtime through
``current_app.extensions`` (webhooks/context.py), never through globals.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import DBAPIError
from werkzeug.exceptions import HTTPException

from webhooks import v1
from webhooks.context import EXTENSION_KEY
from webhooks.dashboard import bp as dashboard_bp
from webhooks.health import bp as health_bp
from webhooks.limits import MAX_BODY_BYTES
from webhooks.metrics import bp as metrics_bp
from webhooks.receiver import bp as receiver_bp
from webhooks.results import bp as results_bp
from worker import runtime as runtimes
from worker.celery_app import build_runtime
from worker.config import Settings, get_settings
from worker.db import is_unavailable
from worker.logs import configure_logging
from worker.runtime import Runtime

__all__ = ["MAX_BODY_BYTES", "create_app"]


def create_app(
    settings: Settings | None = None, *, runtime: Runtime | None = None, **config: Any
) -> Flask:
    """The web app for ``settings`` (default: the process's runtime, or the environment's).

    A runtime of its own is built for settings that are not the process's
    current ones, so two apps with different settings can live side by side.
    """
    runtime = runtime or _runtime_for(settings)
    configure_logging(runtime.settings)
    _make_folders(runtime.settings)
    app = Flask(__name__)
    # One byte over the limit, so that a chunked body past it is seen (receiver.py).
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES + 1
    app.config.update(config)
    app.extensions[EXTENSION_KEY] = runtime

    app.register_blueprint(health_bp)
    app.register_blueprint(metrics_bp)
    app.register_blueprint(receiver_bp)
    app.register_blueprint(results_bp)
    app.register_blueprint(dashboard_bp)
    v1.register(app)
    app.register_error_handler(DBAPIError, _database_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
    return app


def _http_error(error: HTTPException) -> ResponseReturnValue:
    # Under /v1, Flask's own 404/405/413 are problem details like the API's other errors.
    return v1.http_error(error) if v1.handles(request.path) else error


def _unexpected(error: Exception) -> ResponseReturnValue:
    if isinstance(error, HTTPException):
        return _http_error(error)
    if v1.handles(request.path):
        return v1.unexpected(error)
    raise error  # Flask's own 500 (logged with its traceback)


def _database_error(exc: DBAPIError) -> ResponseReturnValue:
    """The database is restarting or a pooled connection was dropped (there is no
    ping per checkout): 503 with Retry-After, so a provider delivers again."""
    if not is_unavailable(exc):
        raise exc  # a statement the database refused: a bug, a 500 with its traceback logged
    logging.getLogger(__name__).warning(
        "%s %s: database unavailable (%s); answered 503",
        request.method,
        request.path,
        type(getattr(exc, "orig", exc)).__name__,
    )
    if v1.handles(request.path):
        return v1.unavailable()
    return jsonify(error="database unavailable; try again"), 503, {"Retry-After": "1"}


def _make_folders(settings: Settings) -> None:
    # The web process makes what it uses, at start and on any backend: the host's
    # metrics folder (its web/ scope is what it adds up at /metrics), and the results
    # folder it serves (a local result store).
    folders = [settings.metrics_folder]
    if settings.archive_results and settings.results_bucket is None:
        folders.append(settings.results_folder)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)


def _runtime_for(settings: Settings | None) -> Runtime:
    installed = runtimes.installed()
    if installed is not None and (settings is None or settings is installed.settings):
        return runtimes.current()
    settings = settings or get_settings()
    if installed is None:
        # The web process's own runtime: the one its Celery messages are sent with.
        return runtimes.install(build_runtime(settings))
    return build_runtime(settings)
