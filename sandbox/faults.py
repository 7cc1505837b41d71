"""Fault injection shared by every provider endpoint (not ``/files``, not ``/_sandbox``).

The decision is taken before the endpoint does anything, and a transient error
or a malformed answer short-circuits the request: a faulted create therefore
never creates a task, so a client may retry it safely. A slow answer is the
exception on purpose: the request is handled normally (the task exists) and
only the answer is late, which is the ambiguous case a client must survive
without creating a duplicate.

This module decides faults and builds the faulted answers; the per-request hooks
that apply them live in ``sandbox.fault_hooks``.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Literal

from flask import Response

from sandbox.config import SandboxConfig
from sandbox.errors import lemondata_error, piapi_error, piclaza_error

ProviderName = Literal["piapi", "piclaza", "lemondata"]


class FaultKind(enum.Enum):
    RATE_LIMITED = "rate_limited"
    TRANSIENT = "transient"
    MALFORMED = "malformed"
    SLOW = "slow"


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    status: int = 200
    seconds: float = 0.0


_MESSAGES = {
    429: "rate limit exceeded, retry later",
    500: "internal server error",
    502: "bad gateway",
    503: "service temporarily unavailable",
    504: "gateway timeout",
}

# LemonData error (type, code) per HTTP status, following its error-handling guide.
_LEMONDATA_KINDS = {
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    502: ("server_error", "upstream_error"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "gateway_timeout"),
}

# What a connection cut mid-body looks like: valid JSON up to a point, then nothing.
_MALFORMED_BODIES = {
    "piapi": b'{"code": 200, "message": "success", "data": {"task_id": "',
    "piclaza": b'{"code": 0, "message": "", "data": {"results": [{"code": 0, "task_',
    "lemondata": b'{"created": 1700000000, "data": [{"url": "http',
}


def decide(config: SandboxConfig, rng: random.Random) -> Fault | None:
    """Draw the fault for one provider call; the caller holds the RNG's lock."""
    if config.rate_limit_all:
        return Fault(FaultKind.RATE_LIMITED, status=429)
    if config.transient_error_rate > 0 and rng.random() < config.transient_error_rate:
        return Fault(FaultKind.TRANSIENT, status=rng.choice(config.transient_error_codes))
    if config.malformed_json_rate > 0 and rng.random() < config.malformed_json_rate:
        return Fault(FaultKind.MALFORMED)
    if config.slow_rate > 0 and rng.random() < config.slow_rate:
        return Fault(FaultKind.SLOW, seconds=config.slow_seconds)
    return None


def error_response(provider: ProviderName, status: int, config: SandboxConfig) -> Response:
    """A transient/rate-limit error answer in ``provider``'s own error shape."""
    message = _MESSAGES.get(status, f"HTTP {status}")
    headers = {"Retry-After": str(config.retry_after_seconds)} if status == 429 else {}
    if provider == "piapi":
        return piapi_error(status, message, headers)
    if provider == "piclaza":
        return piclaza_error(status, message, headers)
    type_, code = _LEMONDATA_KINDS.get(status, ("invalid_request_error", f"http_{status}"))
    extra: dict[str, object] = {"retryable": True}
    if status == 429:
        extra["retry_after"] = config.retry_after_seconds
    return lemondata_error(status, message, type_=type_, code=code, headers=headers, extra=extra)


def malformed_response(provider: ProviderName) -> Response:
    return Response(_MALFORMED_BODIES[provider], status=200, mimetype="application/json")
