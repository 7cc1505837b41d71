"""Error answers become typed exceptions, whatever the body; bad 2xx bodies are caught."""

from __future__ import annotations

import httpx
import pytest
from client_support import JOB_ID, FakeClock, Server, client, job_json, ok, problem

from variflow_client import (
    APIError,
    AuthenticationError,
    Conflict,
    InvalidInput,
    InvalidResponse,
    JobFailed,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    VariflowError,
    WaitTimeout,
)


def get(server: Server) -> None:
    with client(server, FakeClock(), max_retries=0) as c:
        c.jobs.get(JOB_ID)


def test_a_400_names_the_field() -> None:
    detail = "input.image_url: must be an http(s) URL"
    server = Server(problem(400, "invalid-input", "Invalid input", detail, field="input.image_url"))

    with pytest.raises(InvalidInput) as caught:
        get(server)

    error = caught.value
    assert (error.status, error.title, error.detail) == (400, "Invalid input", detail)
    assert error.field == "input.image_url"
    assert error.type == "urn:variflow:problem:invalid-input"
    assert error.problem["field"] == "input.image_url"
    assert str(error) == f"400 Invalid input: {detail}"


def test_a_409_names_the_original_job() -> None:
    server = Server(problem(409, "idempotency-conflict", "Conflict", "key reused", job_id=JOB_ID))

    with pytest.raises(Conflict) as caught:
        get(server)

    assert caught.value.job_id == JOB_ID


def test_a_429_carries_retry_after() -> None:
    server = Server(problem(429, "rate-limited", "Too many", headers={"Retry-After": "5"}))

    with pytest.raises(RateLimited) as caught:
        get(server)

    assert caught.value.retry_after == 5.0


def test_a_429_without_retry_after_has_none() -> None:
    with pytest.raises(RateLimited) as caught:
        get(Server(problem(429, "rate-limited", "Too many")))
    assert caught.value.retry_after is None


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, AuthenticationError),
        (404, NotFound),
        (503, ServiceUnavailable),
        (405, APIError),
        (413, APIError),
    ],
)
def test_each_status_has_its_exception(status: int, error: type[APIError]) -> None:
    with pytest.raises(APIError) as caught:
        get(Server(problem(status, "x", "Some title")))
    assert type(caught.value) is error
    assert caught.value.status == status
    assert caught.value.title == "Some title"


def test_a_proxys_html_error_page_is_an_api_error_without_the_markup() -> None:
    page = "<html><body><h1>502 Bad Gateway</h1></body></html>"
    server = Server(httpx.Response(502, text=page, headers={"content-type": "text/html"}))

    with pytest.raises(APIError) as caught:
        get(server)

    error = caught.value
    assert (error.status, error.title, error.detail, error.problem) == (
        502,
        "Bad Gateway",
        None,
        {},
    )
    assert "<html>" not in str(error)


def test_a_plain_text_error_is_kept_short_on_one_line() -> None:
    server = Server(httpx.Response(500, text="database\nis down " + "x" * 500))

    with pytest.raises(APIError) as caught:
        get(server)

    detail = caught.value.detail
    assert detail is not None and detail.startswith("database is down x")
    assert len(detail) == 200


def test_a_json_content_type_with_a_body_that_is_not_json() -> None:
    server = Server(
        httpx.Response(400, content=b"{oops", headers={"content-type": "application/json"})
    )
    with pytest.raises(InvalidInput) as caught:
        get(server)
    assert caught.value.field is None
    assert caught.value.title == "Bad Request"


def test_a_2xx_that_is_not_json_is_an_invalid_response() -> None:
    with pytest.raises(InvalidResponse, match="not JSON"):
        get(Server(httpx.Response(200, text="<html>")))


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"progress": "40"}, "progress"),
        ({"progress": True}, "progress"),
        ({"id": 7}, "id"),
        ({"status": None}, "status"),
        ({"created_at": "yesterday"}, "created_at"),
        ({"metadata": {"order": 1}}, "metadata.order"),
        ({"results": [{"index": "0", "url": "/r"}]}, "index"),
        ({"error": "boom"}, "error"),
        ({"input": []}, "input"),
    ],
)
def test_a_known_field_of_the_wrong_type_is_an_invalid_response(
    changes: dict[str, object], name: str
) -> None:
    with pytest.raises(InvalidResponse, match=name):
        get(Server(ok(job_json(**changes))))


def test_missing_optional_fields_are_defaults() -> None:
    data = job_json()
    for name in ("tenant", "metadata", "results", "deadline", "submitted_at", "error"):
        del data[name]
    with client(Server(ok(data)), FakeClock()) as c:
        job = c.jobs.get(JOB_ID)
    assert (job.tenant, job.metadata, job.results, job.deadline) == (None, {}, [], None)


def test_null_metadata_and_results_read_as_empty() -> None:
    data = job_json(metadata=None, results=None, tenant=None)
    with client(Server(ok(data)), FakeClock()) as c:
        job = c.jobs.get(JOB_ID)
    assert (job.metadata, job.results, job.tenant) == ({}, [], None)


def test_the_exception_tree() -> None:
    for error in (APIError, JobFailed, WaitTimeout, InvalidResponse):
        assert issubclass(error, VariflowError)
    for error in (InvalidInput, AuthenticationError, NotFound, Conflict, RateLimited):
        assert issubclass(error, APIError)
    assert issubclass(ServiceUnavailable, APIError)
    assert issubclass(WaitTimeout, TimeoutError)
