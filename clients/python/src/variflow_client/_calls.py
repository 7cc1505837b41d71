"""What each operation sends, and how an answer is read: shared by Client and AsyncClient,
which differ only in how they send and sleep."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from variflow_client._errors import InvalidResponse
from variflow_client._version import __version__

USER_AGENT = f"variflow-client/{__version__}"
MAX_WAIT = 60.0  # the most GET /v1/jobs/{id}?wait= holds a request (docs/api.md)
# jobs.wait: an answer sooner than this that is not terminal means the server did not hold
# the request (an old server, a proxy); waiting this long before the next keeps it from
# turning into a busy loop.
MIN_POLL_INTERVAL = 1.0

ImageSource = bytes | str | os.PathLike[str]
Deadline = float | datetime


@dataclass(frozen=True)
class Call:
    """One request, built anew for each try (a multipart body is a stream read once)."""

    method: str
    path: str
    params: tuple[tuple[str, str], ...] = ()
    json: Any = None
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    hold: float = 0.0  # seconds the server may hold the answer, on top of the timeout
    follow_redirects: bool = False


def default_headers(token: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "User-Agent": USER_AGENT,
        "Accept": "application/json, application/problem+json",
    }


def build_request(
    http: httpx.Client | httpx.AsyncClient, call: Call, timeout: float
) -> httpx.Request:
    return http.build_request(
        call.method,
        call.path,
        params=call.params,
        json=call.json,
        data=call.data,
        files=call.files,
        headers=call.headers,
        timeout=httpx.Timeout(timeout + call.hold),
    )


def job_path(job_id: str) -> str:
    # Quoted whole: an id is one path segment, whatever it holds ("../", "?").
    return f"/v1/jobs/{quote(str(job_id), safe='')}"


def create_call(
    provider: str,
    input: Mapping[str, Any],
    *,
    image: ImageSource | None,
    deadline: Deadline | None,
    notify_url: str | None,
    metadata: Mapping[str, str] | None,
    idempotency_key: str | None,
) -> Call:
    # The key is chosen once, here: every retry of this call sends the same one, so the
    # server creates one job however many tries it takes.
    headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
    deadline_value = None if deadline is None else _deadline(deadline)
    if image is None:
        body: dict[str, Any] = {"provider": provider, "input": dict(input)}
        if deadline_value is not None:
            body["deadline"] = deadline_value
        if notify_url is not None:
            body["notify_url"] = notify_url
        if metadata is not None:
            body["metadata"] = dict(metadata)
        return Call("POST", "/v1/jobs", json=body, headers=headers)
    filename, content = _image(image)
    data = {"provider": provider, "input": json.dumps(dict(input))}
    if deadline_value is not None:
        data["deadline"] = str(deadline_value)
    if notify_url is not None:
        data["notify_url"] = notify_url
    if metadata is not None:
        data["metadata"] = json.dumps(dict(metadata))
    files = {"image": (filename, content, _image_type(content))}
    # One boundary for every try, so that a retry sends the very same bytes.
    headers["Content-Type"] = f"multipart/form-data; boundary={uuid.uuid4().hex}"
    return Call("POST", "/v1/jobs", data=data, files=files, headers=headers)


def get_call(job_id: str, wait: float | None) -> Call:
    if wait is None:
        return Call("GET", job_path(job_id))
    hold = max(0.0, min(MAX_WAIT, float(wait)))
    return Call("GET", job_path(job_id), params=(("wait", format(round(hold, 3), "g")),), hold=hold)


def list_params(
    *,
    status: str | Iterable[str] | None,
    provider: str | None,
    created_since: datetime | str | None,
    created_until: datetime | str | None,
    metadata: Mapping[str, str] | None,
    limit: int | None,
    tenant: str | None,
) -> list[tuple[str, str]]:
    """The filters of GET /v1/jobs, checked before the first page is asked for."""
    params: list[tuple[str, str]] = []
    statuses = [status] if isinstance(status, str) else list(status or ())
    params += [("status", s) for s in statuses]
    if provider is not None:
        params.append(("provider", provider))
    if created_since is not None:
        params.append(("created_since", _timestamp(created_since, "created_since")))
    if created_until is not None:
        params.append(("created_until", _timestamp(created_until, "created_until")))
    for key, value in (metadata or {}).items():
        params.append(("metadata", f"{key}:{value}"))
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100:
            raise ValueError(f"limit: the page size, 1 to 100 (got {limit!r})")
        params.append(("limit", str(limit)))
    if tenant is not None:
        params.append(("tenant", tenant))
    return params


def list_call(params: list[tuple[str, str]], cursor: str | None) -> Call:
    cursor_param = (("cursor", cursor),) if cursor else ()
    return Call("GET", "/v1/jobs", params=(*params, *cursor_param))


def cancel_call(job_id: str, reason: str | None) -> Call:
    # Always a JSON body, even empty: a POST without one may be refused as not JSON (415).
    return Call(
        "POST", f"{job_path(job_id)}/cancel", json={} if reason is None else {"reason": reason}
    )


def events_call(job_id: str) -> Call:
    return Call("GET", f"{job_path(job_id)}/events")


def download_call(job_id: str, n: int) -> Call:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: a result's index, 0 or more (got {n!r})")
    # The server answers with the archived copy or a 302 to the provider's URL; httpx
    # drops the Authorization header when the redirect leaves this API's origin.
    return Call(
        "GET",
        f"{job_path(job_id)}/results/{n}",
        headers={"Accept": "*/*"},
        follow_redirects=True,
    )


def wait_hold(remaining: float) -> float:
    """What ?wait= asks for with ``remaining`` seconds left: never more than the API takes."""
    return max(0.0, min(MAX_WAIT, remaining))


def body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise InvalidResponse(
            f"{response.request.method} {response.request.url.path}: "
            f"{response.status_code} answer is not JSON"
        ) from None


def _deadline(value: Deadline) -> float | str:
    if isinstance(value, datetime):
        return _timestamp(value, "deadline")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"deadline: seconds from now or an aware datetime (got {value!r})")
    return value


def _timestamp(value: datetime | str, name: str) -> str:
    if isinstance(value, str):
        return value
    if value.tzinfo is None or value.utcoffset() is None:
        # The API takes RFC 3339 with an offset: a naive datetime is ambiguous.
        raise ValueError(f"{name}: a datetime with a timezone (got a naive one)")
    return value.isoformat()


def _image(image: ImageSource) -> tuple[str, bytes]:
    if isinstance(image, bytes):
        return "image", image
    text = os.fspath(image)
    if text.startswith(("http://", "https://")):
        raise ValueError("image: a URL goes in input as image_url; image takes bytes or a path")
    path = Path(text)
    return path.name, path.read_bytes()


def _image_type(content: bytes) -> str:
    if content.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if content.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def network_message(call: Call, request: httpx.Request, exc: httpx.TransportError) -> str:
    reason = " ".join(str(exc).split()) or "no detail"
    return f"{call.method} {request.url}: {type(exc).__name__}: {reason}"
