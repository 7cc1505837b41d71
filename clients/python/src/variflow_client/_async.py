"""The asynchronous client: the same API as Client, awaited (``async for`` to list)."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any

import httpx

from variflow_client import _calls
from variflow_client._calls import Call, Deadline, ImageSource
from variflow_client._errors import JobFailed, NetworkError, WaitTimeout, error_from_response
from variflow_client._models import Event, Job, Page, events_from_json
from variflow_client._retry import RetryPolicy, retry_after


class AsyncClient:
    """A client of one variflow API, for asyncio (under trio, set ``sleep = trio.sleep``).

    ``sleep`` and ``clock`` are attributes so that tests can replace them.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retry = RetryPolicy(max_retries=max_retries)
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.clock: Callable[[], float] = time.monotonic
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=_calls.default_headers(token),
            timeout=timeout,
            transport=transport,
        )
        self.jobs = AsyncJobs(self)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def send(self, call: Call) -> httpx.Response:
        """The 2xx answer to ``call``, after the retries the policy allows; else an error."""
        attempt = 0
        while True:
            request = _calls.build_request(self._http, call, self.timeout)
            response: httpx.Response | None = None
            try:
                response = await self._http.send(request, follow_redirects=call.follow_redirects)
            except httpx.TransportError as exc:
                if attempt >= self.retry.max_retries or not self.retry.retries_error(exc):
                    raise NetworkError(_calls.network_message(call, request, exc)) from exc
            else:
                if response.is_success:
                    return response
                if attempt >= self.retry.max_retries or not self.retry.retries_status(
                    response.status_code
                ):
                    raise error_from_response(response, retry_after(response))
            await self.sleep(self.retry.delay(attempt, response))
            attempt += 1

    async def call_json(self, call: Call) -> Any:
        return _calls.body(await self.send(call))


class AsyncJobs:
    """``client.jobs`` of an AsyncClient: see :class:`variflow_client.Jobs`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(
        self,
        provider: str,
        input: Mapping[str, Any],
        *,
        image: ImageSource | None = None,
        deadline: Deadline | None = None,
        notify_url: str | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        call = _calls.create_call(
            provider,
            input,
            image=image,
            deadline=deadline,
            notify_url=notify_url,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )
        return Job.from_json(await self._client.call_json(call))

    async def get(self, job_id: str, *, wait: float | None = None) -> Job:
        return Job.from_json(await self._client.call_json(_calls.get_call(job_id, wait)))

    def list(
        self,
        *,
        status: str | Iterable[str] | None = None,
        provider: str | None = None,
        created_since: datetime | str | None = None,
        created_until: datetime | str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
        tenant: str | None = None,
    ) -> AsyncIterator[Job]:
        """``async for job in client.jobs.list(...)``: pages are asked for as needed."""
        params = _calls.list_params(
            status=status,
            provider=provider,
            created_since=created_since,
            created_until=created_until,
            metadata=metadata,
            limit=limit,
            tenant=tenant,
        )
        return self._pages(params)

    async def _pages(self, params: builtins.list[tuple[str, str]]) -> AsyncIterator[Job]:
        cursor: str | None = None
        while True:
            page = Page.from_json(await self._client.call_json(_calls.list_call(params, cursor)))
            for job in page.jobs:
                yield job
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, job_id: str, reason: str | None = None) -> Job:
        return Job.from_json(await self._client.call_json(_calls.cancel_call(job_id, reason)))

    async def events(self, job_id: str) -> builtins.list[Event]:
        return events_from_json(await self._client.call_json(_calls.events_call(job_id)))

    async def wait(self, job_id: str, timeout: float = 600.0) -> Job:
        clock = self._client.clock
        deadline = clock() + timeout
        while True:
            hold = _calls.wait_hold(deadline - clock())
            asked = clock()
            job = await self.get(job_id, wait=hold)
            if job.is_terminal:
                if job.status != "completed":
                    raise JobFailed(job)
                return job
            now = clock()
            if now >= deadline:
                raise WaitTimeout(job, timeout)
            if now - asked < min(hold, _calls.MIN_POLL_INTERVAL):
                await self._client.sleep(min(_calls.MIN_POLL_INTERVAL, deadline - now))

    async def download(self, job_id: str, n: int) -> bytes:
        return (await self._client.send(_calls.download_call(job_id, n))).content
