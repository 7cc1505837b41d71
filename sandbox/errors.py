"""Error answers in each provider's own shape (see docs/providers.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Response, jsonify


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def piapi_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return json_response({"code": status, "message": message}, status, headers)


def piclaza_error(
    status: int,
    message: str,
    headers: Mapping[str, str] | None = None,
    *,
    http_status: int | None = None,
) -> Response:
    """``{"code": status, "message": ...}``; Piclaza may send it in an HTTP 200 answer."""
    return json_response(
        {"code": status, "message": message},
        status if http_status is None else http_status,
        headers,
    )


def lemondata_error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    error: dict[str, Any] = {"message": message, "type": type_, "code": code, "param": param}
    error.update(extra or {})
    return json_response({"error": error}, status, headers)
