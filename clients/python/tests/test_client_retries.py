"""When the client tries again, how long it waits first, and that a create stays one job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from client_support import JOB_ID, FakeClock, Server, client, job_json, ok, problem

from variflow_client import (
    APIError,
    Conflict,
    InvalidInput,
    NetworkError,
    NotFound,
    RateLimited,
    RetryPolicy,
    ServiceUnavailable,
)
from variflow_client._retry import retry_after

CREATED = ok(job_json(status="queued"), status=201)
UNAVAILABLE = problem(503, "unavailable", "Service unavailable", headers={"Retry-After": "2"})


def create(server: Server, clock: FakeClock, **options: int) -> None:
    with client(server, clock, **options) as c:
        c.jobs.create("piclaza", {"image_url": "https://example.com/a.png"})


def test_a_429_is_retried_after_its_retry_after_with_the_same_idempotency_key() -> None:
    server = Server(problem(429, "rate-limited", "Too many", headers={"Retry-After": "7"}), CREATED)
    clock = FakeClock()

    create(server, clock)

    assert len(server.requests) == 2
    first, second = server.header("idempotency-key")
    assert first is not None and first == second
    assert server.requests[0].content == server.requests[1].content
    assert clock.sleeps == [7.0]


def test_a_multipart_create_is_sent_whole_again_on_a_retry() -> None:
    server = Server(UNAVAILABLE, CREATED)
    with client(server, FakeClock()) as c:
        c.jobs.create("piclaza", {}, image=b"\x89PNG\r\n\x1a\n....", idempotency_key="k")

    first, second = server.requests
    assert first.content == second.content and b"\x89PNG" in second.content
    assert server.header("idempotency-key") == ["k", "k"]


def test_a_connection_error_or_a_timeout_is_retried_with_the_same_key() -> None:
    server = Server(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), CREATED)
    clock = FakeClock()

    create(server, clock)

    keys = server.header("idempotency-key")
    assert len(keys) == 3 and len(set(keys)) == 1
    assert len(clock.sleeps) == 2


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_gateway_or_unavailable_answer_is_retried_for_a_get(status: int) -> None:
    server = Server(httpx.Response(status), httpx.Response(status), ok(job_json()))
    clock = FakeClock()
    with client(server, clock) as c:
        c.retry.jitter = lambda: 1.0
        job = c.jobs.get(JOB_ID)

    assert job.id == JOB_ID
    assert len(server.requests) == 3
    assert clock.sleeps == [0.5, 1.0]  # backoff, without a Retry-After


def test_a_cancel_is_retried_too() -> None:
    server = Server(UNAVAILABLE, ok(job_json(status="cancelled")))
    with client(server, FakeClock()) as c:
        assert c.jobs.cancel(JOB_ID).status == "cancelled"
    assert len(server.requests) == 2


def test_retries_stop_after_max_retries_with_the_last_error() -> None:
    server = Server(UNAVAILABLE)
    clock = FakeClock()

    with pytest.raises(ServiceUnavailable) as caught:
        create(server, clock, max_retries=2)

    assert len(server.requests) == 3
    assert clock.sleeps == [2.0, 2.0]
    assert caught.value.retry_after == 2.0


def test_max_retries_0_sends_once() -> None:
    server = Server(UNAVAILABLE, CREATED)
    with pytest.raises(ServiceUnavailable):
        create(server, FakeClock(), max_retries=0)
    assert len(server.requests) == 1


def test_connection_errors_past_max_retries_are_a_network_error() -> None:
    server = Server(httpx.ConnectError("connection refused"))

    with pytest.raises(NetworkError, match="ConnectError: connection refused") as caught:
        create(server, FakeClock(), max_retries=1)

    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (
            problem(400, "invalid-input", "Invalid input", "provider: unknown", field="provider"),
            InvalidInput,
        ),
        (problem(401, "unauthenticated", "Unauthenticated"), APIError),
        (problem(404, "not-found", "Not found"), NotFound),
        (problem(409, "idempotency-conflict", "Conflict", job_id=JOB_ID), Conflict),
        (problem(413, "too-large", "Too large"), APIError),
        (problem(415, "unsupported-media-type", "Unsupported"), APIError),
        (httpx.Response(500), APIError),
    ],
)
def test_other_errors_are_never_retried(answer: httpx.Response, error: type[APIError]) -> None:
    server = Server(answer, CREATED)
    clock = FakeClock()

    with pytest.raises(error):
        create(server, clock)

    assert len(server.requests) == 1
    assert clock.sleeps == []


def test_a_retry_after_longer_than_the_cap_is_capped() -> None:
    server = Server(problem(429, "rate-limited", "Slow down", headers={"Retry-After": "3600"}))
    clock = FakeClock()

    with pytest.raises(RateLimited) as caught:
        create(server, clock, max_retries=1)

    assert clock.sleeps == [60.0]
    assert caught.value.retry_after == 3600.0  # what the server said, for the caller


def test_retry_after_as_an_http_date() -> None:
    past = format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)
    future = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)

    assert retry_after(httpx.Response(503, headers={"Retry-After": past})) == 0.0
    after = retry_after(httpx.Response(503, headers={"Retry-After": future}))
    assert after is not None and after > 3000  # an hour, give or take the test's own time
    assert RetryPolicy().delay(0, httpx.Response(503, headers={"Retry-After": future})) == 60.0


@pytest.mark.parametrize("value", ["", "soon", "nan", "inf", "-5"])
def test_a_retry_after_that_is_no_delay_falls_back_to_backoff(value: str) -> None:
    response = httpx.Response(503, headers={"Retry-After": value})
    policy = RetryPolicy(jitter=lambda: 1.0)

    delay = policy.delay(2, response)

    assert delay == (0.0 if value == "-5" else 2.0)


def test_backoff_doubles_up_to_its_cap_and_is_jittered() -> None:
    full = RetryPolicy(jitter=lambda: 1.0)
    none = RetryPolicy(jitter=lambda: 0.0)

    assert [full.delay(n, None) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert none.delay(3, None) == 0.0


def test_an_unsupported_url_scheme_is_not_retried() -> None:
    server = Server(httpx.UnsupportedProtocol("ftp"))
    clock = FakeClock()
    with pytest.raises(NetworkError):
        create(server, clock)
    assert len(server.requests) == 1 and clock.sleeps == []
