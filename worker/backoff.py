"""The one retry-delay policy: exponential backoff with full jitter, honouring Retry-After.

Used wherever variflow waits before trying again — a create that failed
transiently, a poll that found nothing new or failed, a notification the
application's endpoint refused. Full jitter (a uniform draw between zero and
the exponential ceiling) spreads retries of many jobs that failed together,
so they do not return together (AWS Architecture Blog, "Exponential Backoff
and Jitter"). A provider's Retry-After is a floor, never shortened by jitter.

The delays are scheduled (a Celery countdown, a ``next_poll_at``), not slept
in a loop around a call, which is why this is a small function rather than a
retry library's decorator (stamina, tenacity).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delay after ``n`` failures: uniform(0, min(cap, start * factor**n)), at least ``floor``."""

    start: float
    cap: float
    factor: float = 2.0
    floor: float = 0.1

    def ceiling(self, attempt: int) -> float:
        return min(self.cap, self.start * self.factor ** min(max(attempt, 0), 64))

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after ``attempt`` failures (0 = the first retry)."""
        drawn = random.uniform(0, self.ceiling(attempt))
        return max(drawn, self.floor, retry_after or 0.0)
