"""The webhook receiver: a small Flask app, one blueprint per concern."""

from __future__ import annotations

from typing import Any

from flask import Flask

from webhooks.limits import MAX_BODY_BYTES
from worker.config import Settings, get_settings
from worker.logs import configure_logging


def create_app(settings: Settings | None = None, **config: Any) -> Flask:
    settings = settings or get_settings()
    configure_logging(settings)
    app = Flask(__name__)
    # One byte over the limit, so that a chunked body past it is seen (receiver.py).
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES + 1
    app.config.update(config)

    from webhooks.dashboard import bp as dashboard_bp
    from webhooks.health import bp as health_bp
    from webhooks.metrics import bp as metrics_bp
    from webhooks.receiver import bp as receiver_bp
    from webhooks.results import bp as results_bp

    app.register_blueprint(health_bp)
    app.register_blueprint(metrics_bp)
    app.register_blueprint(receiver_bp)
    app.register_blueprint(results_bp)
    app.register_blueprint(dashboard_bp)
    return app
