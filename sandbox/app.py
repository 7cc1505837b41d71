"""The Flask app that serves the three emulated providers under path prefixes.

Base URLs for the worker: ``{sandbox}/piapi``, ``{sandbox}/piclaza``,
``{sandbox}/lemondata``. Result files are at ``{sandbox}/files/<name>.png``,
controls at ``{sandbox}/_sandbox/...``.
"""

from __future__ import annotations

from flask import Flask, Response, request

from sandbox import lemondata, piapi, piclaza
from sandbox.admin import admin_bp, files_bp
from sandbox.clock import Clock
from sandbox.config import SandboxConfig
from sandbox.context import EXTENSION_KEY, current_state
from sandbox.state import SandboxState


def _count_request(response: Response) -> Response:
    # Control calls are left out so that reading the stats does not change them.
    if not request.path.startswith("/_sandbox"):
        rule = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        current_state().record_request(f"{request.method} {rule}", response.status_code)
    return response


def create_sandbox_app(config: SandboxConfig | None = None, *, clock: Clock | None = None) -> Flask:
    """The app; ``clock`` replaces the real clocks (tests: ``sandbox.clock.ManualClock``)."""
    app = Flask("sandbox")
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION_KEY] = SandboxState(config, clock=clock)
    app.register_blueprint(piapi.bp)
    app.register_blueprint(piclaza.bp)
    app.register_blueprint(lemondata.bp)
    app.register_blueprint(admin_bp)
    app.register_blueprint(files_bp)
    app.after_request(_count_request)
    return app
