"""Errors as RFC 9457 problem details (``application/problem+json``).

Every error of the /v1 API is one of these, raised as :class:`ProblemError` or
made from an HTTP error Flask raised (404 route, 405, 413, malformed body); so is
the 503 of ``/results`` (webhooks/results.py). It lives outside webhooks/v1 because
webhooks/v1/views.py imports webhooks/results.py: results importing webhooks.v1
back would be an import cycle (the ``acyclic`` import-linter contract).
``type`` is a URN naming the kind of problem; clients branch on it or on
``status``, never on ``detail`` (which is for people).
"""

from __future__ import annotations

import json
from typing import Any

from flask import Response
from werkzeug.exceptions import HTTPException

MEDIA_TYPE = "application/problem+json"

# status -> (type, title) for the problems the API answers.
KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid-input", "Invalid input"),
    401: ("unauthenticated", "Authentication required"),
    403: ("forbidden", "Not allowed"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    409: ("idempotency-conflict", "Idempotency key reused"),
    413: ("too-large", "Request body too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    503: ("unavailable", "Service unavailable"),
}


class ProblemError(Exception):
    """Answer the request with this problem."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **members: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.members = {name: value for name, value in members.items() if value is not None}


def invalid(field: str, message: str) -> ProblemError:
    return ProblemError(400, f"{field}: {message}", field=field)


def response(problem: ProblemError) -> Response:
    kind, title = KINDS.get(problem.status, ("error", "Error"))
    body = {
        "type": f"urn:variflow:problem:{kind}",
        "title": title,
        "status": problem.status,
        "detail": problem.detail,
        **problem.members,
    }
    answer = Response(json.dumps(body), status=problem.status, mimetype=MEDIA_TYPE)
    answer.headers.update(problem.headers)
    return answer


def from_http(error: HTTPException) -> Response:
    """Flask's own 4xx (unknown route, wrong method, body too large) as a problem."""
    status = error.code or 500
    headers = {}
    if status == 405 and error.valid_methods:  # type: ignore[attr-defined]
        headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
    detail = error.description or KINDS.get(status, ("", "Error"))[1]
    return response(ProblemError(status, detail, headers=headers))
