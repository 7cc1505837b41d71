"""variflow's exceptions, in one tree, and the error codes a failed job carries.

    VariflowError
    ├── ConfigError            a VARIFLOW_* variable is missing or malformed (also a RuntimeError)
    ├── InvalidInput           bad input from an application; names the field (also a ValueError)
    │   └── IdempotencyConflict  the key was used for a different request; names that job
    ├── JobNotFound            no job with that id (also a LookupError)
    ├── InvalidWebhook         a webhook body that cannot be read (also a ValueError)
    └── UpstreamError          a provider call gave no usable answer
        ├── TransientUpstreamError   worth retrying: transport trouble, 429, 5xx
        └── PermanentUpstreamError   refused; the job fails with it
            ├── ProviderNotConfigured
            └── InputImageError      the input image cannot be used

Each subclass of a built-in keeps code written against the built-in working
(``except ValueError`` still catches bad input).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The ``error_code`` of a failed (or cancelled) job; the README lists their meaning."""

    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    INVALID_INPUT = "invalid_input"
    SUBMIT_FAILED = "submit_failed"
    SUBMIT_OUTCOME_UNKNOWN = "submit_outcome_unknown"
    RESULT_STORAGE_FAILED = "result_storage_failed"
    NO_RESULT = "no_result"
    UPSTREAM_FAILED = "upstream_failed"
    UPSTREAM_REJECTED = "upstream_rejected"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    RATE_LIMITED = "rate_limited"
    BUDGET_EXHAUSTED = "budget_exhausted"
    PROVIDER_NOT_CONFIGURED = "provider_not_configured"
    TASK_NOT_FOUND = "task_not_found"
    ASYNC_TASK_NOT_FOUND = "async_task_not_found"
    NOT_CANCELLABLE = "not_cancellable"


class VariflowError(Exception):
    """The root of every exception variflow raises on purpose."""


class ConfigError(VariflowError, RuntimeError):
    """A configuration value is missing or malformed; the message names the variable."""


class InvalidInput(VariflowError, ValueError):
    """Input an application gave is wrong; ``field`` names it and nothing was stored."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class IdempotencyConflict(InvalidInput):
    """The idempotency key was first used for a different request: ``job_id`` is its job."""

    def __init__(self, key: str, job_id: object) -> None:
        super().__init__(
            "idempotency_key", f"{key!r} was already used for a different request (job {job_id})"
        )
        self.job_id = job_id


class JobNotFound(VariflowError, LookupError):
    def __init__(self, job_id: object) -> None:
        super().__init__(f"no job with id {job_id}")


class InvalidWebhook(VariflowError, ValueError):
    """A webhook body that cannot be read; the receiver answers 400 with the message."""


class UpstreamError(VariflowError):
    """A provider call did not give a usable answer."""

    def __init__(self, message: str, *, code: str = ErrorCode.UPSTREAM_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = str(code)


class TransientUpstreamError(UpstreamError):
    """Worth retrying later: connection trouble, timeouts, 429 and 5xx."""

    def __init__(
        self,
        message: str,
        *,
        code: str = ErrorCode.UPSTREAM_UNAVAILABLE,
        retry_after: float | None = None,
        maybe_processed: bool = False,
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after
        # The request went out and no clear answer came back (a read timeout,
        # a dropped connection, a garbled 2xx): a create may have happened.
        self.maybe_processed = maybe_processed


class PermanentUpstreamError(UpstreamError):
    """The provider refused the request; retrying cannot help. The job fails with it."""


class ProviderNotConfigured(PermanentUpstreamError):
    def __init__(self, message: str) -> None:
        super().__init__(message, code=ErrorCode.PROVIDER_NOT_CONFIGURED)


class InputImageError(PermanentUpstreamError):
    """The job's input image cannot be used (fetched, or checked before sending)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=ErrorCode.INVALID_INPUT)


def input_error(exc: ValueError, default_field: str = "input") -> InvalidInput:
    """An InvalidInput from a ValueError whose message reads "field: what is wrong"."""
    if isinstance(exc, InvalidInput):
        return exc
    field, sep, message = str(exc).partition(": ")
    if not sep or " " in field:
        return InvalidInput(default_field, str(exc))
    return InvalidInput(field, message)
