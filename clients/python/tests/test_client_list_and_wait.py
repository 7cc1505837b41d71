"""Listing follows next_cursor lazily; wait long-polls and ends in a Job or an exception."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest
from client_support import JOB_ID, FakeClock, HoldingServer, Server, client, job_json, ok, paged

from variflow_client import JobFailed, WaitTimeout


def test_list_follows_the_cursor_across_three_pages_lazily() -> None:
    server = Server(paged)
    with client(server, FakeClock()) as c:
        jobs = c.jobs.list(
            status=["processing", "queued"],
            provider="piapi",
            created_since=datetime(2026, 12, 1, tzinfo=UTC),
            created_until="2026-12-03T00:00:00Z",
            metadata={"order": "A-1042", "team": "x"},
            limit=2,
            tenant="acme",
        )
        assert server.requests == []  # nothing asked before the first job is wanted
        assert next(jobs).id == "j1"
        assert len(server.requests) == 1
        rest = [job.id for job in jobs]

    assert rest == ["j2", "j3", "j4", "j5"]
    assert [r.url.params.get("cursor") for r in server.requests] == [None, "c1", "c2"]
    for request in server.requests:
        params = request.url.params
        assert request.url.path == "/v1/jobs"
        assert params.get_list("status") == ["processing", "queued"]
        assert params["provider"] == "piapi"
        assert params["created_since"] == "2026-12-01T00:00:00+00:00"
        assert params["created_until"] == "2026-12-03T00:00:00Z"
        assert params.get_list("metadata") == ["order:A-1042", "team:x"]
        assert (params["limit"], params["tenant"]) == ("2", "acme")


def test_list_stops_asking_when_the_caller_stops() -> None:
    server = Server(paged)
    with client(server, FakeClock()) as c:
        first_three = [j.id for j in itertools.islice(c.jobs.list(), 3)]
    assert first_three == ["j1", "j2", "j3"]
    assert len(server.requests) == 2


def test_list_without_filters_sends_none() -> None:
    server = Server(ok({"data": [], "next_cursor": None}))
    with client(server, FakeClock()) as c:
        assert list(c.jobs.list(status="failed")) == []
    assert str(server.requests[0].url.params) == "status=failed"


@pytest.mark.parametrize("limit", [0, 101, True])
def test_a_bad_page_size_fails_before_any_request(limit: int) -> None:
    server = Server(paged)
    with client(server, FakeClock()) as c, pytest.raises(ValueError, match="limit"):
        c.jobs.list(limit=limit)
    assert server.requests == []


def waits(server: Server) -> list[str]:
    return [r.url.params["wait"] for r in server.requests]


def test_wait_long_polls_until_completed() -> None:
    clock = FakeClock()
    server = Server(HoldingServer(clock, "queued", "processing", "completed"))
    with client(server, clock) as c:
        job = c.jobs.wait(JOB_ID, timeout=150)

    assert job.status == "completed"
    assert waits(server) == ["60", "60", "30"]  # min(60, what is left)
    assert {r.url.path for r in server.requests} == {f"/v1/jobs/{JOB_ID}"}
    assert clock.sleeps == []  # the server holds: the client never sleeps between polls


def test_wait_asks_for_a_longer_read_timeout_than_the_hold() -> None:
    clock = FakeClock()
    server = Server(HoldingServer(clock, "completed"))
    with client(server, clock, timeout=10.0) as c:
        c.jobs.wait(JOB_ID)
    assert server.requests[0].extensions["timeout"]["read"] == 70.0


def test_wait_times_out_with_the_last_state() -> None:
    clock = FakeClock()
    server = Server(HoldingServer(clock, "processing"))
    with client(server, clock) as c, pytest.raises(WaitTimeout) as caught:
        c.jobs.wait(JOB_ID, timeout=90)

    assert waits(server) == ["60", "30"]
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.job.status == "processing"
    assert "not finished after 90s (still processing)" in str(caught.value)


def test_wait_with_no_time_left_asks_once() -> None:
    clock = FakeClock()
    server = Server(HoldingServer(clock, "queued"))
    with client(server, clock) as c, pytest.raises(WaitTimeout):
        c.jobs.wait(JOB_ID, timeout=0)
    assert waits(server) == ["0"]


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_wait_raises_job_failed_for_a_failed_or_cancelled_job(status: str) -> None:
    clock = FakeClock()
    error = {"code": "upstream_failed", "message": "the provider lost the image"}
    server = Server(HoldingServer(clock, "processing", status, error=error))
    with client(server, clock) as c, pytest.raises(JobFailed) as caught:
        c.jobs.wait(JOB_ID)

    failed = caught.value
    assert failed.job.status == status
    assert (failed.code, failed.message) == ("upstream_failed", "the provider lost the image")


def test_wait_never_busy_polls_a_server_that_does_not_hold() -> None:
    clock = FakeClock()
    server = Server(ok(job_json(status="processing")))  # answers at once, fake time stands still
    with client(server, clock) as c, pytest.raises(WaitTimeout):
        c.jobs.wait(JOB_ID, timeout=5)

    assert clock.sleeps == [1.0] * 5
    assert len(server.requests) == 6
