"""What every provider adapter implements, the values they exchange, and their settings.

Nothing outside ``worker/providers/`` knows which provider it talks to: the
rest of variflow reads the capability flags below and calls the protocol. An
adapter declares its own settings (a :class:`ProviderSettings` subclass read
from ``VARIFLOW_<NAME>_*``), its capabilities and its limits; variflow's
settings are assembled from those declarations (worker/config.py), and the
adapter is built from its section with :meth:`Provider.from_settings`.

Adapters import only the ground floor (errors, status values, metrics
counters): no settings, no database, no Celery, no flows.
"""

from __future__ import annotations

import email.utils
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol, Self

import httpx
from pydantic import AnyHttpUrl, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker import validation
from worker.errors import (
    ErrorCode,
    InvalidInput,
    InvalidWebhook,
    PermanentUpstreamError,
    ProviderNotConfigured,
    TransientUpstreamError,
    UpstreamError,
)
from worker.metrics import observe_upstream, upstream_outcome
from worker.status import UpstreamState

__all__ = [
    "AdapterContext",
    "InputImage",
    "InvalidInput",
    "InvalidWebhook",
    "PermanentUpstreamError",
    "PollTarget",
    "Provider",
    "ProviderNotConfigured",
    "ProviderSettings",
    "Submission",
    "SubmitRequest",
    "TransientUpstreamError",
    "UpstreamError",
]

TRANSIENT_STATUS_CODES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class InputImage:
    content: bytes
    filename: str
    content_type: str = "image/png"


@dataclass(frozen=True)
class SubmitRequest:
    job_id: uuid.UUID
    params: Mapping[str, Any]
    webhook_url: str | None = None
    webhook_secret: str | None = None
    image: InputImage | None = None


@dataclass(frozen=True)
class Submission:
    """What the create call answered: a task to follow, or (sync providers) the end state."""

    state: UpstreamState
    poll_url: str | None = None


@dataclass(frozen=True)
class PollTarget:
    job_id: uuid.UUID
    upstream_task_id: str
    poll_url: str | None = None


class ProviderSettings(BaseSettings):
    """A provider's own settings, read from ``VARIFLOW_<NAME>_*`` (the prefix is set
    by worker/config.py from the adapter's name). Subclasses add their fields,
    with defaults and bounds, and give ``base_url`` its default."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    api_key: SecretStr | None = None
    base_url: AnyHttpUrl
    # The capacity of the account of api_key (worker/accounts.py); unset: no limit.
    max_in_flight: int | None = Field(default=None, ge=1)
    max_staged: int | None = Field(default=None, ge=0)  # only where queues_over_capacity
    creates_per_minute: int | None = Field(default=None, ge=1)
    requests_per_minute: int | None = Field(default=None, ge=1)
    daily_jobs: int | None = Field(default=None, ge=1)
    daily_failed: int | None = Field(default=None, ge=0)
    price_per_job: float | None = Field(default=None, ge=0)
    price_per_image: float | None = Field(default=None, ge=0)
    daily_spend_cap: float | None = Field(default=None, ge=0)

    def key(self) -> str | None:
        """The API key in clear text, for the adapter's auth header only."""
        return self.api_key.get_secret_value() if self.api_key else None

    def longest_call(self, http_timeout: float) -> float:
        """The longest a single call to this provider may take (a submit claim must outlive it)."""
        return http_timeout


@dataclass(frozen=True)
class AdapterContext:
    """What an adapter gets from the process besides its own settings."""

    client: httpx.Client
    max_image_bytes: int = 4 * 1024 * 1024


class Provider(Protocol):
    name: ClassVar[str]
    # The adapter's settings section (VARIFLOW_<NAME>_*).
    settings_model: ClassVar[type[ProviderSettings]]
    supports_webhook: ClassVar[bool]
    # The header a webhook carries its shared secret in (webhook providers only).
    webhook_secret_header: ClassVar[str | None]
    can_cancel: ClassVar[bool]
    # The provider holds tasks created beyond an account's slots and starts them as
    # slots free (PiAPI's "staged"), rather than refusing them: max_staged may be set.
    queues_over_capacity: ClassVar[bool]
    # The provider takes an image file: a URL input must be fetched by the worker.
    needs_image_bytes: ClassVar[bool]
    # Jobs one poll request can carry (1 = one request per job).
    batch_poll_size: int
    # Webhook providers: how long a job may go without a webhook before it is
    # polled (None for providers that are only polled).
    webhook_grace: float | None

    @classmethod
    def from_settings(cls, settings: Any, context: AdapterContext) -> Self:
        """The adapter for its settings section (an instance of ``settings_model``)."""
        ...

    def validate(self, params: Mapping[str, Any], image: InputImage | None) -> dict[str, Any]:
        """Normalised params, or InvalidInput naming the wrong field. No I/O.

        An input image arrives either as ``params["image_url"]`` or as ``image``.
        """
        ...

    def submit(self, request: SubmitRequest) -> Submission: ...

    def poll(self, targets: Sequence[PollTarget]) -> dict[str, UpstreamState]:
        """States keyed by upstream task id; a batch-wide failure raises UpstreamError."""
        ...

    def parse_webhook(self, body: Any) -> UpstreamState:
        """The state a webhook body reports (with its upstream task id).

        InvalidWebhook when the body is malformed."""
        ...

    def cancel(self, target: PollTarget) -> bool:
        """Ask the provider to cancel; True when it did."""
        ...


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), clamped to sane bounds."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, seconds))


def send(
    client: httpx.Client,
    provider: str,
    method: str,
    url: str,
    *,
    operation: str,
    **kwargs: Any,
) -> httpx.Response:
    """One HTTP call with transport failures, 429 and 5xx turned into TransientUpstreamError.

    ``operation`` ("create", "poll", "cancel") labels the call's metrics.
    """
    started = time.perf_counter()
    outcome = "transport_error"  # until an HTTP answer arrives
    try:
        response = client.request(method, url, **kwargs)
        outcome = upstream_outcome(
            response.status_code, transient=response.status_code in TRANSIENT_STATUS_CODES
        )
    except NOT_SENT as exc:
        raise TransientUpstreamError(f"{provider}: {type(exc).__name__}: {exc}") from exc
    except httpx.TransportError as exc:
        # Sent, but no answer: the provider may have acted on it.
        raise TransientUpstreamError(
            f"{provider}: no answer ({type(exc).__name__})", maybe_processed=True
        ) from exc
    finally:
        observe_upstream(provider, operation, outcome, time.perf_counter() - started)
    if response.status_code in TRANSIENT_STATUS_CODES:
        raise TransientUpstreamError(
            f"{provider}: HTTP {response.status_code}",
            code=ErrorCode.RATE_LIMITED
            if response.status_code == 429
            else ErrorCode.UPSTREAM_UNAVAILABLE,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )
    return response


# Failures that happen before the request reaches the provider: always safe to retry.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)
# Bounds on a provider's Retry-After: never a busy loop, never past Redis's
# visibility timeout (a longer countdown would be delivered twice).
RETRY_AFTER_MIN, RETRY_AFTER_MAX = 1.0, 1800.0


def json_body(response: httpx.Response, provider: str) -> Any:
    """The JSON body; None for an error answer without one (the status says enough)."""
    try:
        return response.json()
    except ValueError as exc:
        if not response.is_success:
            return None
        # A 2xx with a broken body: a glitch, but the provider did act on it.
        raise TransientUpstreamError(
            f"{provider}: HTTP {response.status_code} with a body that is not JSON",
            maybe_processed=True,
        ) from exc


def require_str(
    params: Mapping[str, Any], name: str, *, max_chars: int = validation.MAX_NAME_CHARS
) -> str:
    """A required, non-blank text parameter, stripped: at most ``max_chars`` characters,
    without NUL or lone surrogates (worker.validation.text)."""
    return validation.required_text(name, params.get(name), max_chars=max_chars)


def reject_image(params: Mapping[str, Any], image: InputImage | None, provider: str) -> None:
    """For a provider that takes no input image: neither ``image`` nor ``image_url``."""
    if image is not None or "image_url" in params:
        raise InvalidInput("image", f"{provider} does not take an input image")


def error_message(body: Any) -> str | None:
    """The human message of an error body: ``message`` or OpenAI-style ``error.message``."""
    if not isinstance(body, Mapping):
        return None
    error = body.get("error")
    if isinstance(error, Mapping) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str) and error:
        return error
    message = body.get("message")
    return str(message) if message else None


def reject_unknown(params: Mapping[str, Any], allowed: set[str], provider: str) -> None:
    """InvalidInput naming the first parameter ``provider`` does not take (a name that is
    not clean, short text is named ``params``, with a safe rendering in the message)."""
    unknown = sorted(
        (key for key in params if key not in allowed),
        key=lambda key: key if isinstance(key, str) else validation.describe(key),
    )
    if unknown:
        key = unknown[0]
        field = validation.param_name(key)
        shown = "" if field == key else f"{validation.describe(key)} is "
        raise InvalidInput(
            field, f"{shown}not a {provider} parameter (allowed: {', '.join(sorted(allowed))})"
        )
