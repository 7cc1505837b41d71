"""Install the fault-injection hooks on a provider blueprint.

Kept apart from ``sandbox.faults`` (pure decisions and answers) because the hooks
read the per-request state through ``sandbox.context``, and ``sandbox.state``
itself needs ``sandbox.faults``.
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, g

from sandbox.context import current_state
from sandbox.faults import FaultKind, ProviderName, error_response, malformed_response


def install(blueprint: Blueprint, provider: ProviderName) -> None:
    """Register the fault hooks on a provider blueprint (before its auth check)."""

    def inject_fault() -> Response | None:
        state = current_state()
        fault = state.decide_fault()
        if fault is None:
            return None
        if fault.kind is FaultKind.MALFORMED:
            return malformed_response(provider)
        if fault.kind is FaultKind.SLOW:
            g.sandbox_slow_seconds = fault.seconds
            return None
        return error_response(provider, fault.status, state.config)

    def delay_answer(response: Response) -> Response:
        seconds: float = g.pop("sandbox_slow_seconds", 0.0)
        if seconds > 0:
            time.sleep(seconds)
        return response

    blueprint.before_request(inject_fault)
    blueprint.after_request(delay_answer)
