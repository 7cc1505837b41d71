"""A scripted stand-in for the variflow API (an httpx.MockTransport handler) and a fake
clock, so that the client's tests neither open sockets nor really sleep."""

from __future__ import annotations

import email.parser
import email.policy
import json
from collections.abc import Callable
from email.message import Message
from typing import Any

import httpx

from variflow_client import AsyncClient, Client

BASE = "https://variflow.test"
TOKEN = "vf_test_token"
JOB_ID = "3f0c2a4e-8a65-4a3f-9a6e-0d5c1f6b2b11"

Answer = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


def job_json(**changes: Any) -> dict[str, Any]:
    """A job as GET /v1/jobs/{id} answers it (docs/api.md), with ``changes``."""
    job: dict[str, Any] = {
        "id": JOB_ID,
        "provider": "piclaza",
        "status": "processing",
        "progress": 40,
        "tenant": "acme",
        "input": {"image_url": "https://example.com/cat.png"},
        "metadata": {"order": "A-1042"},
        "idempotency_key": "7c1e",
        "error": None,
        "results": [],
        "deadline": "2026-12-02T10:15:00Z",
        "created_at": "2026-12-02T10:00:00Z",
        "updated_at": "2026-12-02T10:00:05.250000+00:00",
        "submitted_at": "2026-12-02T10:00:01Z",
        "completed_at": None,
    }
    job.update(changes)
    return job


def ok(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=data, headers=headers)


def problem(
    status: int,
    kind: str,
    title: str,
    detail: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> httpx.Response:
    """An RFC 9457 error as the API sends it (``extra``: field, job_id...)."""
    body: dict[str, Any] = {"type": f"urn:variflow:problem:{kind}", "title": title}
    body["status"] = status
    if detail is not None:
        body["detail"] = detail
    body.update(extra)
    return httpx.Response(
        status,
        content=json.dumps(body).encode(),
        headers={"content-type": "application/problem+json", **(headers or {})},
    )


class Server:
    """Answers each request with the next answer; the last one is repeated forever.

    An answer is a response, an exception to raise (a connection error), or a function
    of the request. Every request is kept in ``requests``.
    """

    def __init__(self, *answers: Answer) -> None:
        assert answers
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, httpx.Response):
            # A fresh copy each time: a response is read once.
            return httpx.Response(
                answer.status_code, headers=answer.headers, content=answer.content
            )
        return answer(request)

    @property
    def paths(self) -> list[str]:
        return [r.url.path for r in self.requests]

    def header(self, name: str) -> list[str | None]:
        return [r.headers.get(name) for r in self.requests]


PAGES = {
    None: (["j1", "j2"], "c1"),
    "c1": (["j3", "j4"], "c2"),
    "c2": (["j5"], None),
}


def paged(request: httpx.Request) -> httpx.Response:
    ids, cursor = PAGES[request.url.params.get("cursor")]
    return ok({"data": [job_json(id=i) for i in ids], "next_cursor": cursor})


class HoldingServer:
    """Holds each ?wait= request for as long as asked (on the fake clock), then answers
    with the next status."""

    def __init__(self, clock: FakeClock, *statuses: str, error: object = None) -> None:
        self.clock = clock
        self.statuses = list(statuses)
        self.error = error

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.clock.advance(float(request.url.params["wait"]))
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        error = self.error if status in ("failed", "cancelled") else None
        return ok(job_json(status=status, error=error))


class FakeClock:
    """time.monotonic and time.sleep (or asyncio.sleep) that only move when told to."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


def client(server: Server, clock: FakeClock, **options: Any) -> Client:
    made = Client(BASE, TOKEN, transport=httpx.MockTransport(server), **options)
    made.sleep = clock.sleep
    made.clock = clock
    return made


def async_client(server: Server, clock: FakeClock, **options: Any) -> AsyncClient:
    made = AsyncClient(BASE, TOKEN, transport=httpx.MockTransport(server), **options)
    made.sleep = clock.async_sleep
    made.clock = clock
    return made


def form_parts(request: httpx.Request) -> dict[str, Message]:
    """The parts of a multipart/form-data request by field name, parsed by the stdlib."""
    content_type = request.headers["content-type"]
    assert content_type.startswith("multipart/form-data; boundary=")
    raw = f"Content-Type: {content_type}\r\n\r\n".encode() + request.content
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    parts: dict[str, Message] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        assert isinstance(name, str)
        parts[name] = part
    return parts


def part_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()
