"""Per-key capacity of the emulated providers: slots, the staged line, the daily
allowance of failed tasks and the request-rate window, with their counters.

Pure bookkeeping: no Flask, no threads. ``SandboxState`` holds the lock, passes
the time and the limits in force (read from the knobs at every call, so a knob
change applies at once) and turns decisions into provider answers.

Time is settled lazily and exactly: ``Account.settle(now)`` replays, in time
order, every slot release up to ``now`` and starts the next staged task *at the
moment the slot freed*, not at the moment somebody looked. Running counts, the
high-water mark and failure days are therefore the same whether the sandbox is
polled every millisecond or once an hour.

- A task holds a slot from the moment it starts (at creation, or when it
  leaves the staged line) until it is terminal: completed, failed or
  cancelled. The high-water mark counts slot holders only.
- Staged tasks start first in, first out, per key.
- A failed task counts against the daily allowance on the UTC day it failed;
  a cancelled one never counts (the user cancelled it, Midjourney did not
  reject it).
- The rate window slides: a request is refused while ``requests_per_minute``
  accepted requests lie in the 60 seconds before it. Refused requests are not
  counted, so a client that waits ``Retry-After`` is served.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
from collections import Counter, deque
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, Protocol

from sandbox.config import WILDCARD_KEY, SandboxConfig

RefusalKind = Literal["rate_limited", "over_concurrency", "daily_allowance"]
REFUSAL_KINDS: tuple[RefusalKind, ...] = ("rate_limited", "over_concurrency", "daily_allowance")
RATE_WINDOW_SECONDS = 60.0
# The limits /_sandbox/stats shows for each provider's keys.
LIMITS_SHOWN = {
    "piapi": ("max_concurrent", "daily_failed_allowance"),
    "piclaza": ("max_concurrent",),
    "lemondata": ("requests_per_minute",),
}


def key_fingerprint(api_key: str) -> str:
    """How stats name a key: keys are secrets. Piclaza's ``user_id`` is ``user_`` + this."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


def utc_day(wall: float) -> date:
    return datetime.fromtimestamp(wall, UTC).date()


@dataclass(frozen=True)
class Moment:
    """One reading of both clocks, so that monotonic event times map to UTC days."""

    mono: float
    wall: float

    def wall_at(self, mono: float) -> float:
        return self.wall - (self.mono - mono)


@dataclass(frozen=True)
class Limits:
    """One key's limits at one provider; None = unlimited."""

    max_concurrent: int | None = None
    # What happens beyond max_concurrent: PiAPI queues (``staged``), Piclaza refuses.
    stage_excess: bool = False
    daily_failed_allowance: int | None = None
    requests_per_minute: int | None = None


def _lookup(table: dict[str, int], api_key: str) -> int | None:
    return table.get(api_key, table.get(WILDCARD_KEY))


def limits_for(config: SandboxConfig, provider: str, api_key: str) -> Limits:
    if provider == "piapi":
        return Limits(
            max_concurrent=_lookup(config.piapi_max_concurrent, api_key),
            stage_excess=True,
            daily_failed_allowance=_lookup(config.piapi_daily_failed_allowance, api_key),
        )
    if provider == "piclaza":
        return Limits(max_concurrent=_lookup(config.piclaza_max_concurrent, api_key))
    return Limits(requests_per_minute=_lookup(config.lemondata_requests_per_minute, api_key))


class Holder(Protocol):
    """A task as an account sees it (``sandbox.tasks.Task`` is one)."""

    task_id: str
    # Set by the account when the task gets a slot; None while staged.
    start_mono: float | None

    @property
    def end_mono(self) -> float | None:
        """When the task is terminal (cancel included); None while staged."""
        ...

    @property
    def incorrect(self) -> bool:
        """True if the task ends failed by the provider's decision (not cancelled)."""
        ...


class CapacityRefused(Exception):
    """A create refused by a limit; nothing was created. ``message`` is for the client."""

    def __init__(self, kind: RefusalKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class RateVerdict:
    allowed: bool
    limit: int
    remaining: int
    # Unix time at which the window next has room: when the oldest counted request
    # leaves it (for a refusal, when the refused request would be accepted).
    reset_wall: float
    retry_after: int

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(self.reset_wall)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after)
        return headers


class Account:
    """One API key at one provider."""

    def __init__(self, provider: str, api_key: str) -> None:
        self.provider = provider
        self.api_key = api_key
        self._running: dict[str, Holder] = {}
        # (end_mono, tie-breaker, holder); entries left behind by a cancel are skipped.
        self._ends: list[tuple[float, int, Holder]] = []
        self._sequence = itertools.count()
        self._staged: deque[Holder] = deque()
        self._failures: Counter[date] = Counter()
        self._window: deque[float] = deque()
        self.refusals: Counter[str] = Counter()
        self.high_water = 0
        self.staged_total = 0
        # When a timer is already due to settle this account (set by SandboxState).
        self.wake_at: float | None = None

    # -- slots ----------------------------------------------------------------

    def settle(self, now: Moment, limits: Limits) -> list[Holder]:
        """Release every slot freed up to ``now``, in time order; returns the tasks started."""
        started: list[Holder] = []
        while self._ends and self._ends[0][0] <= now.mono:
            end, _, holder = heapq.heappop(self._ends)
            if self._running.get(holder.task_id) is not holder or holder.end_mono != end:
                continue
            del self._running[holder.task_id]
            if holder.incorrect:
                self._failures[utc_day(now.wall_at(end))] += 1
            started += self._fill(end, limits)
        # A raised or removed limit frees slots now, not at a release.
        started += self._fill(now.mono, limits)
        return started

    def check(self, now: Moment, limits: Limits) -> None:
        """Raise ``CapacityRefused`` if a create must be refused now (after ``settle``)."""
        allowance = limits.daily_failed_allowance
        today = utc_day(now.wall)
        if allowance is not None and self._failures[today] >= allowance:
            midnight = datetime.combine(today + timedelta(days=1), datetime.min.time(), UTC)
            self._refuse(
                "daily_allowance",
                f"daily limit of incorrect tasks reached: {self._failures[today]} failed "
                f"today, {allowance} allowed per UTC day for this API key; no more tasks "
                f"until {midnight.isoformat().replace('+00:00', 'Z')}",
            )
        if not limits.stage_excess and not self._has_slot(limits):
            self._refuse(
                "over_concurrency",
                f"concurrency limit exceeded: {len(self._running)} tasks running, at most "
                f"{limits.max_concurrent} at once for this API key; retry when one finishes",
            )

    def enroll(self, holder: Holder, now: Moment, limits: Limits) -> bool:
        """Start ``holder`` now if a slot is free (True), else stage it (False)."""
        if not self._staged and self._has_slot(limits):
            self._start(holder, now.mono)
            return True
        self._staged.append(holder)
        self.staged_total += 1
        return False

    def cancelled(self, holder: Holder, now: Moment, limits: Limits) -> list[Holder]:
        """``holder`` was cancelled at ``now``: leave the line or free the slot."""
        if any(waiting is holder for waiting in self._staged):
            self._staged = deque(waiting for waiting in self._staged if waiting is not holder)
        elif holder.task_id in self._running and holder.end_mono is not None:
            heapq.heappush(self._ends, (holder.end_mono, next(self._sequence), holder))
        return self.settle(now, limits)

    def next_release(self) -> float | None:
        """The earliest end of a running task, if a staged task waits for it."""
        if not self._staged or not self._running:
            return None
        ends = [h.end_mono for h in self._running.values() if h.end_mono is not None]
        return min(ends) if ends else None

    def _has_slot(self, limits: Limits) -> bool:
        return limits.max_concurrent is None or len(self._running) < limits.max_concurrent

    def _fill(self, at: float, limits: Limits) -> list[Holder]:
        started: list[Holder] = []
        while self._staged and self._has_slot(limits):
            holder = self._staged.popleft()
            self._start(holder, at)
            started.append(holder)
        return started

    def _start(self, holder: Holder, at: float) -> None:
        holder.start_mono = at
        end = holder.end_mono
        assert end is not None  # it has just started
        self._running[holder.task_id] = holder
        heapq.heappush(self._ends, (end, next(self._sequence), holder))
        self.high_water = max(self.high_water, len(self._running))

    def _refuse(self, kind: RefusalKind, message: str) -> None:
        self.refusals[kind] += 1
        raise CapacityRefused(kind, message)

    # -- request rate ---------------------------------------------------------

    def count_request(self, now: Moment, limits: Limits) -> RateVerdict | None:
        """Count one request against the sliding window; None when the key has no limit."""
        limit = limits.requests_per_minute
        if limit is None:
            return None
        window = self._window
        while window and window[0] <= now.mono - RATE_WINDOW_SECONDS:
            window.popleft()
        if len(window) >= limit:
            self.refusals["rate_limited"] += 1
            frees = window[len(window) - limit] + RATE_WINDOW_SECONDS
            return RateVerdict(
                allowed=False,
                limit=limit,
                remaining=0,
                reset_wall=now.wall_at(frees),
                retry_after=max(1, math.ceil(frees - now.mono)),
            )
        window.append(now.mono)
        return RateVerdict(
            allowed=True,
            limit=limit,
            remaining=limit - len(window),
            reset_wall=now.wall_at(window[0] + RATE_WINDOW_SECONDS),
            retry_after=0,
        )

    # -- reporting ------------------------------------------------------------

    def stats(self, now: Moment, limits: Limits) -> dict[str, Any]:
        return {
            "limits": {name: getattr(limits, name) for name in LIMITS_SHOWN[self.provider]},
            "running": len(self._running),
            "high_water": self.high_water,
            "staged_now": len(self._staged),
            "staged_total": self.staged_total,
            "failed_today": self._failures[utc_day(now.wall)],
            "refused": {kind: self.refusals[kind] for kind in REFUSAL_KINDS},
        }


class Capacity:
    """Every account, created on first use."""

    def __init__(self) -> None:
        self._accounts: dict[tuple[str, str], Account] = {}

    def account(self, provider: str, api_key: str) -> Account:
        key = (provider, api_key)
        found = self._accounts.get(key)
        if found is None:
            found = self._accounts[key] = Account(provider, api_key)
        return found

    def is_current(self, account: Account) -> bool:
        """False once a reset has replaced ``account`` (a stale timer must do nothing)."""
        return self._accounts.get((account.provider, account.api_key)) is account

    def accounts(self) -> list[Account]:
        return list(self._accounts.values())

    def clear(self) -> None:
        self._accounts.clear()
