"""The one retry-delay policy: capped exponential backoff with jitter, honouring Retry-After.

Used wherever variflow waits before trying again — a create that failed
transiently, a poll that found nothing new or failed, a notification the
application's endpoint refused. The delay after ``n`` failures is drawn from
``[c * (1 - jitter), c]`` where ``c = min(cap, start * factor**n)``: with
``jitter=1`` ("full jitter", AWS Architecture Blog, "Exponential Backoff and
Jitter") retries of many jobs that failed together spread over the whole
window; a smaller jitter keeps a schedule close to its nominal times (polls).
A provider's Retry-After is a floor, never shortened by jitter.

The delays are scheduled (a Celery countdown, a ``next_poll_at``), not slept in a
loop around a call, which is why this is a small class rather than a retry
library's decorator (stamina, tenacity).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delay after ``n`` failures: within ``[c * (1 - jitter), c]``, ``c`` capped, at least
    ``floor`` and at least the provider's Retry-After."""

    start: float
    cap: float
    factor: float = 2.0
    jitter: float = 1.0
    floor: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter: a fraction from 0 to 1")

    def ceiling(self, attempt: int) -> float:
        return min(self.cap, self.start * self.factor ** min(max(attempt, 0), 64))

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after ``attempt`` failures (0 = the first retry)."""
        ceiling = self.ceiling(attempt)
        drawn = ceiling * random.uniform(1.0 - self.jitter, 1.0)
        return max(drawn, self.floor, retry_after or 0.0)
