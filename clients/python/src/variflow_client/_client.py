"""The synchronous client: ``Client(base_url, token).jobs``."""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any

import httpx

from variflow_client import _calls
from variflow_client._calls import Call, Deadline, ImageSource
from variflow_client._errors import JobFailed, NetworkError, WaitTimeout, error_from_response
from variflow_client._models import Event, Job, Page, events_from_json
from variflow_client._retry import RetryPolicy, retry_after


class Client:
    """A client of one variflow API.

    ``sleep`` and ``clock`` are attributes so that tests (and callers with their own
    event loop of some kind) can replace them: retries and ``jobs.wait`` use nothing else
    to wait or to tell the time.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retry = RetryPolicy(max_retries=max_retries)
        self.sleep: Callable[[float], None] = time.sleep
        self.clock: Callable[[], float] = time.monotonic
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=_calls.default_headers(token),
            timeout=timeout,
            transport=transport,
        )
        self.jobs = Jobs(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def send(self, call: Call) -> httpx.Response:
        """The 2xx answer to ``call``, after the retries the policy allows; else an error."""
        attempt = 0
        while True:
            request = _calls.build_request(self._http, call, self.timeout)
            response: httpx.Response | None = None
            try:
                response = self._http.send(request, follow_redirects=call.follow_redirects)
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
            self.sleep(self.retry.delay(attempt, response))
            attempt += 1

    def call_json(self, call: Call) -> Any:
        return _calls.body(self.send(call))


class Jobs:
    """``client.jobs``: create, read, list, cancel, wait for and download jobs."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(
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
        """Create a job (or get the one this ``idempotency_key`` created).

        ``image`` (bytes or a file's path) is uploaded as multipart/form-data; an image
        by URL or base64 goes in ``input`` as ``image_url`` / ``image_b64``. Without an
        ``idempotency_key`` one is generated, so that retries never create two jobs.
        """
        call = _calls.create_call(
            provider,
            input,
            image=image,
            deadline=deadline,
            notify_url=notify_url,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )
        return Job.from_json(self._client.call_json(call))

    def get(self, job_id: str, *, wait: float | None = None) -> Job:
        """The job; with ``wait`` (0-60 s) the server answers once it is terminal or then."""
        return Job.from_json(self._client.call_json(_calls.get_call(job_id, wait)))

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
    ) -> Iterator[Job]:
        """Every matching job, newest first, asking for the next page only when needed.

        ``limit`` is the page size (1-100); to stop after N jobs, ``itertools.islice``.
        """
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

    def _pages(self, params: builtins.list[tuple[str, str]]) -> Iterator[Job]:
        cursor: str | None = None
        while True:
            page = Page.from_json(self._client.call_json(_calls.list_call(params, cursor)))
            yield from page.jobs
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str, reason: str | None = None) -> Job:
        """Cancel the job; a terminal one is returned as it is."""
        return Job.from_json(self._client.call_json(_calls.cancel_call(job_id, reason)))

    def events(self, job_id: str) -> builtins.list[Event]:
        """The job's timeline, oldest first."""
        return events_from_json(self._client.call_json(_calls.events_call(job_id)))

    def wait(self, job_id: str, timeout: float = 600.0) -> Job:
        """The job once completed; JobFailed if it failed or was cancelled, WaitTimeout if
        it is not terminal after ``timeout`` seconds. Long-polls: one request per minute."""
        clock = self._client.clock
        deadline = clock() + timeout
        while True:
            hold = _calls.wait_hold(deadline - clock())
            asked = clock()
            job = self.get(job_id, wait=hold)
            if job.is_terminal:
                if job.status != "completed":
                    raise JobFailed(job)
                return job
            now = clock()
            if now >= deadline:
                raise WaitTimeout(job, timeout)
            if now - asked < min(hold, _calls.MIN_POLL_INTERVAL):
                self._client.sleep(min(_calls.MIN_POLL_INTERVAL, deadline - now))

    def download(self, job_id: str, n: int) -> bytes:
        """Result image ``n`` (0-based): the archived copy, or the provider's via redirect."""
        return self._client.send(_calls.download_call(job_id, n)).content
