"""The sandbox's one source of time: the real clocks by default, a hand-moved one in tests.

Everything the sandbox times reads the same clock: task lifecycles and webhook
timers (``monotonic``), timestamps and UTC days (``time``), the LemonData rate
window and LemonData's synchronous wait (``sleep``). A test that injects a
``ManualClock`` can therefore jump past a rate window or into the next UTC day
without sleeping, and every part of the sandbox agrees on what time it is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (lifecycles, timers, windows)."""
        ...

    def time(self) -> float:
        """Unix time in seconds (timestamps shown to clients, UTC days)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass (LemonData's synchronous create waits for its task)."""
        ...

    def on_jump(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever the clock is moved by hand, so timer threads re-check."""
        ...


class SystemClock:
    """The real clocks; they never jump, so ``on_jump`` callbacks are never called."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def on_jump(self, callback: Callable[[], None]) -> None:
        return None


SYSTEM_CLOCK = SystemClock()

DEFAULT_START = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


class ManualClock:
    """A clock that moves only when told; both readings move together.

    ``sleep`` advances the clock instead of blocking: a synchronous LemonData
    create then "takes" its task's time, which in a single-threaded test is
    what happened. Thread-safe.
    """

    def __init__(self, start: datetime = DEFAULT_START) -> None:
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        self._lock = threading.Lock()
        self._wall = start.timestamp()
        # Any origin will do for a monotonic clock; a non-zero one catches code
        # that treats 0.0 as "unset".
        self._mono = 1000.0
        self._listeners: list[Callable[[], None]] = []

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def time(self) -> float:
        with self._lock:
            return self._wall

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), UTC)

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    def on_jump(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(callback)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock cannot go back")
        with self._lock:
            self._mono += seconds
            self._wall += seconds
            listeners = list(self._listeners)
        # Outside the lock: listeners take their own locks and may read the clock.
        for listener in listeners:
            listener()

    def advance_to(self, moment: datetime) -> None:
        """Move to ``moment`` (timezone-aware, not earlier than now)."""
        if moment.tzinfo is None:
            raise ValueError("moment must be timezone-aware")
        self.advance(moment.timestamp() - self.time())
