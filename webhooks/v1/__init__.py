"""The HTTP jobs API, under /v1 (docs/api.md).

Its operations are in webhooks/v1/views.py; this module adds what surrounds
them: the token check before every operation that is not public, errors as
problem details, and the OpenAPI document with its browsable page.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from flask import Flask, Response, render_template_string, request, send_from_directory
from flask.typing import ResponseReturnValue
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]
from werkzeug.exceptions import HTTPException

from webhooks import problems
from webhooks.problems import ProblemError
from webhooks.v1.auth import authenticate
from webhooks.v1.views import api, bp

log = logging.getLogger(__name__)
PREFIX = bp.url_prefix or "/v1"
SWAGGER_UI = Path(swagger_ui_path)
DESCRIPTION = (
    "Create image-variation jobs, follow them to their end and fetch their results. "
    "Every operation but this document needs `Authorization: Bearer <token>` "
    "(`variflow tokens create NAME`). Errors are RFC 9457 problem details."
)
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>variflow API</title>
<link rel="stylesheet" href="{{ prefix }}/docs/static/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="{{ prefix }}/docs/static/swagger-ui-bundle.js"></script>
<script src="{{ prefix }}/docs/static/init.js"></script></body></html>
"""
DOCS_INIT = (
    "window.ui = SwaggerUIBundle({url: '%s/openapi.json', dom_id: '#ui', deepLinking: true});"
)


@bp.get("/openapi.json")
def openapi_document() -> ResponseReturnValue:
    return _document()


@bp.get("/docs")
def docs_page() -> ResponseReturnValue:
    return render_template_string(DOCS_PAGE, prefix=PREFIX)


@bp.get("/docs/static/init.js")
def docs_init() -> ResponseReturnValue:
    return Response(DOCS_INIT % PREFIX, mimetype="text/javascript")


@bp.get("/docs/static/<path:name>")
def docs_static(name: str) -> ResponseReturnValue:
    return send_from_directory(SWAGGER_UI, name, max_age=86400)


PUBLIC_ENDPOINTS = frozenset(
    f"{bp.name}.{view}" for view in ("openapi_document", "docs_page", "docs_init", "docs_static")
)


@bp.before_request
def _authenticate() -> None:
    if request.endpoint not in PUBLIC_ENDPOINTS:
        authenticate()


def _document() -> dict[str, Any]:
    try:
        release = version("variflow")
    except PackageNotFoundError:  # run from a checkout without installing
        release = "0"
    return api.document(
        title="variflow",
        version=release,
        description=DESCRIPTION,
        server=request.host_url.rstrip("/"),
    )


def register(app: Flask) -> None:
    """Add the API to the web app, with problem details for every error under /v1."""
    app.register_blueprint(bp)
    app.register_error_handler(ProblemError, problems.response)


def handles(path: str) -> bool:
    """Whether an error on this path is the API's to answer (as a problem)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def http_error(error: HTTPException) -> Response:
    return problems.from_http(error)


def unexpected(error: Exception) -> Response:
    """A bug: logged with its traceback, answered as a bare 500 problem (no details)."""
    log.exception("%s %s failed", request.method, request.path, exc_info=error)
    return problems.response(ProblemError(500, "an unexpected error; it has been logged"))


def unavailable() -> Response:
    return problems.response(
        ProblemError(503, "the database is unavailable; try again", headers={"Retry-After": "1"})
    )
