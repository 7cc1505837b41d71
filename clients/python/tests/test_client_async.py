"""AsyncClient: the same behaviour as Client, awaited (run with asyncio.run)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any

import httpx
import pytest
from client_support import (
    JOB_ID,
    FakeClock,
    HoldingServer,
    Server,
    async_client,
    form_parts,
    job_json,
    ok,
    paged,
    part_text,
    problem,
)

from variflow_client import InvalidInput, Job, JobFailed, NotFound, WaitTimeout


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


def test_create_retries_with_the_same_key_and_sleeps_asynchronously() -> None:
    server = Server(
        httpx.ConnectError("refused"),
        problem(429, "rate-limited", "Too many", headers={"Retry-After": "3"}),
        ok(job_json(status="queued"), status=201),
    )
    clock = FakeClock()

    async def go() -> Job:
        async with async_client(server, clock) as c:
            return await c.jobs.create("piclaza", {"image_url": "https://example.com/a.png"})

    job = run(go())

    assert job.status == "queued"
    keys = server.header("idempotency-key")
    assert len(keys) == 3 and len(set(keys)) == 1 and keys[0]
    assert len(clock.sleeps) == 2 and clock.sleeps[1] == 3.0
    assert server.requests[0].headers["user-agent"] == "variflow-client/0.1.0"


def test_create_with_image_bytes_sends_multipart() -> None:
    server = Server(ok(job_json(), status=201))

    async def go() -> None:
        async with async_client(server, FakeClock()) as c:
            await c.jobs.create("piclaza", {"grouping": True}, image=b"\xff\xd8\xff\xe0rest")

    run(go())

    parts = form_parts(server.requests[0])
    assert parts["image"].get_content_type() == "image/jpeg"
    assert json.loads(part_text(parts["input"])) == {"grouping": True}


def test_list_follows_the_cursor_with_async_for() -> None:
    server = Server(paged)

    async def go() -> list[str]:
        async with async_client(server, FakeClock()) as c:
            return [job.id async for job in c.jobs.list(provider="piclaza")]

    assert run(go()) == ["j1", "j2", "j3", "j4", "j5"]
    assert [r.url.params.get("cursor") for r in server.requests] == [None, "c1", "c2"]


def test_wait_long_polls_then_raises_job_failed() -> None:
    clock = FakeClock()
    error = {"code": "timeout", "message": "past its deadline"}
    server = Server(HoldingServer(clock, "processing", "failed", error=error))

    async def go() -> None:
        async with async_client(server, clock) as c:
            await c.jobs.wait(JOB_ID, timeout=100)

    with pytest.raises(JobFailed) as caught:
        run(go())

    assert caught.value.code == "timeout"
    assert [r.url.params["wait"] for r in server.requests] == ["60", "40"]


def test_wait_times_out() -> None:
    clock = FakeClock()
    server = Server(HoldingServer(clock, "processing"))

    async def go() -> None:
        async with async_client(server, clock) as c:
            await c.jobs.wait(JOB_ID, timeout=30)

    with pytest.raises(WaitTimeout) as caught:
        run(go())
    assert caught.value.job.status == "processing"


def test_wait_never_busy_polls() -> None:
    clock = FakeClock()
    server = Server(ok(job_json(status="queued")))

    async def go() -> None:
        async with async_client(server, clock) as c:
            await c.jobs.wait(JOB_ID, timeout=3)

    with pytest.raises(WaitTimeout):
        run(go())
    assert clock.sleeps == [1.0, 1.0, 1.0]


def test_errors_are_mapped_and_not_retried() -> None:
    server = Server(
        problem(400, "invalid-input", "Invalid input", "n: 1 to 10", field="input.n"),
        problem(404, "not-found", "Not found"),
    )
    clock = FakeClock()

    async def go() -> tuple[BaseException, BaseException]:
        async with async_client(server, clock) as c:
            with pytest.raises(InvalidInput) as bad:
                await c.jobs.create("lemondata", {"n": 11})
            with pytest.raises(NotFound) as missing:
                await c.jobs.cancel(JOB_ID)
            return bad.value, missing.value

    bad, missing = run(go())

    assert isinstance(bad, InvalidInput) and bad.field == "input.n"
    assert isinstance(missing, NotFound)
    assert len(server.requests) == 2 and clock.sleeps == []


def test_get_events_and_download() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return ok({"data": []})
        if "/results/" in request.url.path:
            return httpx.Response(200, content=b"img")
        return ok(job_json())

    server = Server(answer)

    async def go() -> tuple[Job, list[Any], bytes]:
        async with async_client(server, FakeClock()) as c:
            return (
                await c.jobs.get(JOB_ID),
                await c.jobs.events(JOB_ID),
                await c.jobs.download(JOB_ID, 2),
            )

    job, events, data = run(go())

    assert (job.id, events, data) == (JOB_ID, [], b"img")
    assert server.paths[-1] == f"/v1/jobs/{JOB_ID}/results/2"


def test_the_async_context_manager_closes_the_http_client() -> None:
    c = async_client(Server(ok(job_json())), FakeClock())

    async def go() -> None:
        async with c:
            pass
        await c.jobs.get(JOB_ID)

    with pytest.raises(RuntimeError):
        run(go())
