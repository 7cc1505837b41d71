"""Background webhook delivery: a timer thread plus a few sender threads.

Nothing here runs inside an HTTP request. The timer thread fires callbacks at
their due time (a task's status changes, retry backoffs); the senders POST the
bodies. Each delivery keeps its body bytes for every retry and duplicate, so a
receiver sees exactly the same ``timestamp`` again, as PiAPI suggests for
spotting duplicates. ``clear()`` forgets everything scheduled (sandbox reset):
work items carry the generation they were created in and stale ones are
skipped. Times are on the sandbox's clock (``sandbox.clock``); a hand-moved
clock wakes the timer thread whenever it jumps.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from sandbox.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

SENDER_THREADS = 4
JOIN_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class WebhookDelivery:
    task_id: str
    status: str
    endpoint: str
    body: bytes
    secret: str | None
    copy: int = 0  # 0 = the original, 1 = an injected duplicate


@dataclass(frozen=True)
class DeliveryAttempt:
    task_id: str
    status: str
    copy: int
    attempt: int
    at: float
    http_status: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.http_status is not None and 200 <= self.http_status < 300


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int
    base_seconds: float
    timeout_seconds: float

    def delay_before(self, attempt: int) -> float:
        """Backoff before ``attempt`` (2, 3, ...): base, 2*base, 4*base, ..."""
        return float(self.base_seconds * 2 ** (attempt - 2))


@dataclass(frozen=True)
class _Job:
    generation: int
    delivery: WebhookDelivery
    attempt: int
    then: Callable[[], None] | None


class DeliveryEngine:
    """Schedules callbacks and sends deliveries with retries, off the request path.

    ``policy`` is read before every attempt so knob changes apply at once.
    ``on_attempt(attempt, final)`` reports each attempt; ``final`` is true when
    the delivery succeeded or gave up. ``then`` callbacks of ``send`` run after
    the final attempt, which is how ordered sequences are built.
    """

    def __init__(
        self,
        policy: Callable[[], RetryPolicy],
        on_attempt: Callable[[DeliveryAttempt, bool], None],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._policy = policy
        self._on_attempt = on_attempt
        self._clock = clock
        self._lock = threading.Condition()
        self._timers: list[tuple[float, int, int, Callable[[], None]]] = []
        self._sequence = itertools.count()
        self._generation = 0
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._stop_event = threading.Event()
        self._client: httpx.Client | None = None
        clock.on_jump(self._recheck_timers)

    # -- scheduling ---------------------------------------------------------

    def call_at(self, when_mono: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the timer thread once ``clock.monotonic() >= when_mono``."""
        with self._lock:
            self._ensure_started()
            heapq.heappush(
                self._timers, (when_mono, next(self._sequence), self._generation, callback)
            )
            self._lock.notify_all()

    def send(self, delivery: WebhookDelivery, then: Callable[[], None] | None = None) -> None:
        with self._lock:
            self._ensure_started()
            generation = self._generation
        self._jobs.put(_Job(generation, delivery, 1, then))

    def _recheck_timers(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def clear(self) -> None:
        """Forget every scheduled callback and pending delivery."""
        with self._lock:
            self._generation += 1
            self._timers.clear()
            self._lock.notify_all()

    def stop(self) -> None:
        with self._lock:
            self._generation += 1
            self._timers.clear()
            threads, self._threads = self._threads, []
            self._stop_event.set()
            self._lock.notify_all()
        for _ in range(SENDER_THREADS if threads else 0):
            self._jobs.put(None)
        for thread in threads:
            thread.join(JOIN_TIMEOUT_SECONDS)
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- threads ------------------------------------------------------------

    def _ensure_started(self) -> None:
        """Start the threads on first use, so apps that never deliver cost nothing."""
        if self._threads:
            return
        self._stop_event = threading.Event()
        self._client = httpx.Client(follow_redirects=False)
        stop_event = self._stop_event
        timer = threading.Thread(
            target=self._run_timers, args=(stop_event,), name="sandbox-webhook-timer", daemon=True
        )
        senders = [
            threading.Thread(target=self._run_sender, name=f"sandbox-webhook-{i}", daemon=True)
            for i in range(SENDER_THREADS)
        ]
        self._threads = [timer, *senders]
        for thread in self._threads:
            thread.start()

    def _run_timers(self, stop_event: threading.Event) -> None:
        while True:
            with self._lock:
                while not stop_event.is_set():
                    if not self._timers:
                        self._lock.wait()
                        continue
                    delay = self._timers[0][0] - self._clock.monotonic()
                    if delay <= 0:
                        break
                    self._lock.wait(delay)
                if stop_event.is_set():
                    return
                _, _, generation, callback = heapq.heappop(self._timers)
                current = generation == self._generation
            if current:
                try:
                    callback()
                except Exception:
                    log.exception("sandbox webhook timer callback failed")

    def _run_sender(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._attempt(job)
            except Exception:
                log.exception("sandbox webhook delivery crashed")

    def _attempt(self, job: _Job) -> None:
        with self._lock:
            if job.generation != self._generation:
                return
            client = self._client
        if client is None:
            return
        policy = self._policy()
        delivery = job.delivery
        headers = {"Content-Type": "application/json", "User-Agent": "variflow-sandbox/piapi"}
        if delivery.secret:
            headers["x-webhook-secret"] = delivery.secret
        http_status: int | None = None
        error: str | None = None
        try:
            response = client.post(
                delivery.endpoint,
                content=delivery.body,
                headers=headers,
                timeout=policy.timeout_seconds,
            )
            http_status = response.status_code
            if not 200 <= http_status < 300:
                error = f"HTTP {http_status}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        attempt = DeliveryAttempt(
            task_id=delivery.task_id,
            status=delivery.status,
            copy=delivery.copy,
            attempt=job.attempt,
            at=self._clock.time(),
            http_status=http_status,
            error=error,
        )
        final = attempt.ok or job.attempt >= policy.attempts
        with self._lock:
            if job.generation != self._generation:
                return
        self._on_attempt(attempt, final)
        if final:
            if job.then is not None:
                job.then()
            return
        retry = _Job(job.generation, delivery, job.attempt + 1, job.then)
        self.call_at(
            self._clock.monotonic() + policy.delay_before(retry.attempt),
            lambda: self._jobs.put(retry),
        )
