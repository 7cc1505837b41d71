"""The exceptions, and the mapping of an error response (RFC 9457 problem+json) to them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from variflow_client._models import Job

# How much of a non-JSON error body (a proxy's HTML page) is kept in the message.
MAX_BODY_SHOWN = 200


class VariflowError(Exception):
    """Base of every exception this client raises."""


class NetworkError(VariflowError):
    """The API could not be reached (connection refused, DNS, timeout), retries spent.

    The httpx exception is ``__cause__``.
    """


class InvalidResponse(VariflowError):
    """A 2xx answer that is not what the API documents (not JSON, a field of the wrong type)."""


class APIError(VariflowError):
    """A non-2xx answer. ``problem`` is the RFC 9457 body ({} when it was not JSON)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        problem: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.problem: dict[str, Any] = problem or {}
        # Seconds the server asked to wait (Retry-After), when it said.
        self.retry_after = retry_after
        super().__init__(f"{status} {title}" + (f": {detail}" if detail else ""))

    @property
    def type(self) -> str | None:
        value = self.problem.get("type")
        return value if isinstance(value, str) else None


class InvalidInput(APIError):
    """400: a field is wrong (``field``, e.g. "input.image_url"); nothing was stored."""

    @property
    def field(self) -> str | None:
        value = self.problem.get("field")
        return value if isinstance(value, str) else None


class AuthenticationError(APIError):
    """401: no token, or an unknown or revoked one."""


class NotFound(APIError):
    """404: no such job for this token's tenant (or no such route)."""


class Conflict(APIError):
    """409: the Idempotency-Key was used for a different request; ``job_id`` is that job."""

    @property
    def job_id(self) -> str | None:
        value = self.problem.get("job_id")
        return value if isinstance(value, str) else None


class RateLimited(APIError):
    """429: too many requests; ``retry_after`` is how long the server asked to wait."""


class ServiceUnavailable(APIError):
    """503: the service is restarting (its database); try again after ``retry_after``."""


class JobFailed(VariflowError):
    """Raised by ``jobs.wait`` when the job ended failed or cancelled (``job.status``)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.code = job.error.code if job.error else job.status
        self.message = job.error.message if job.error else ""
        super().__init__(f"job {job.id} {job.status}: {self.code}: {self.message}")


class WaitTimeout(VariflowError, TimeoutError):
    """Raised by ``jobs.wait`` when the job is not terminal in time; ``job`` is its last state."""

    def __init__(self, job: Job, timeout: float) -> None:
        self.job = job
        self.timeout = timeout
        super().__init__(f"job {job.id} not finished after {timeout:g}s (still {job.status})")


_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidInput,
    401: AuthenticationError,
    404: NotFound,
    409: Conflict,
    429: RateLimited,
    503: ServiceUnavailable,
}


def error_from_response(response: httpx.Response, retry_after: float | None) -> APIError:
    """The exception for a non-2xx answer, whatever its body (problem+json, HTML, empty)."""
    problem = _problem(response)
    title = problem.get("title")
    if not isinstance(title, str) or not title:
        title = response.reason_phrase or "HTTP error"
    detail = problem.get("detail")
    if not isinstance(detail, str):
        detail = None if problem else _body_excerpt(response)
    cls = _BY_STATUS.get(response.status_code, APIError)
    return cls(response.status_code, title, detail, problem, retry_after)


def _problem(response: httpx.Response) -> dict[str, Any]:
    content_type = response.headers.get("content-type", "")
    if "json" not in content_type:
        return {}
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _body_excerpt(response: httpx.Response) -> str | None:
    """A plain-text body, on one line and short; markup (a proxy's HTML page) is left out."""
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("text/plain"):
        return None
    try:
        text = " ".join(response.text.split())
    except (UnicodeDecodeError, LookupError):
        return None
    if len(text) > MAX_BODY_SHOWN:
        text = text[: MAX_BODY_SHOWN - 1] + "…"
    return text or None
