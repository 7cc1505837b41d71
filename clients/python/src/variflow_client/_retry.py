"""When to try a request again, and how long to wait first.

Every method is retried alike: a create carries an Idempotency-Key (the same one on
each try), and a cancel of a cancelled job leaves it as it is, so no retry can do a
thing twice. Only answers that say "later" are retried, never another 4xx.
"""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass
class RetryPolicy:
    """``max_retries`` tries after the first; waits honour Retry-After, else back off."""

    max_retries: int = 3
    max_delay: float = 60.0  # the most a Retry-After is honoured for
    backoff_base: float = 0.5  # seconds before the first retry, doubled on each one...
    backoff_cap: float = 8.0  # ...up to this
    # Full jitter: the wait is this fraction of the backoff, so clients do not retry in step.
    jitter: Callable[[], float] = field(default=random.random)

    def retries_error(self, exc: httpx.TransportError) -> bool:
        # A URL with an unknown scheme will not get better.
        return not isinstance(exc, httpx.UnsupportedProtocol)

    def retries_status(self, status: int) -> bool:
        return status in RETRY_STATUSES

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds before retry number ``attempt + 1`` (``attempt`` counts from 0)."""
        if response is not None:
            after = retry_after(response)
            if after is not None:
                return min(after, self.max_delay)
        return self.jitter() * min(self.backoff_cap, self.backoff_base * 2.0**attempt)


def retry_after(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds (delay-seconds or an HTTP-date), None without one."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
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
    return max(0.0, seconds)
