"""``GET /v1/jobs/{id}?wait=N``: hold requests until their jobs end, cheaply.

One watcher per web process checks every job being waited for in one query, a
few times a second, and wakes the requests whose job became terminal. A
waiting request holds its thread and an Event, never a database connection; a
thousand waiters cost one small query per tick, not a thousand.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Collection

from worker.states import JobStatus

log = logging.getLogger(__name__)

TICK_SECONDS = 0.2
# Threads of a web process never held by waiters (webhooks and creates need them).
WEB_FREE_THREADS = 4
Check = Callable[[Collection[uuid.UUID]], dict[uuid.UUID, str]]


class Watcher:
    """Wakes waiters when their job is terminal (or gone)."""

    def __init__(self, check: Check, *, max_waiters: int, tick: float = TICK_SECONDS) -> None:
        self._check = check
        self._max_waiters = max_waiters
        self._tick = tick
        self._lock = threading.Lock()
        self._waiters: dict[uuid.UUID, list[threading.Event]] = {}
        self._thread: threading.Thread | None = None
        self.pid = os.getpid()

    def watched(self) -> frozenset[uuid.UUID]:
        """The jobs someone is waiting for now."""
        with self._lock:
            return frozenset(self._waiters)

    def wait(self, job_id: uuid.UUID, timeout: float) -> bool:
        """Block until the job is terminal (True) or ``timeout`` seconds pass (False).

        With ``max_waiters`` requests waiting already, return False at once: the
        request answers with the job as it is, and the client asks again.
        """
        ended = threading.Event()
        with self._lock:
            if sum(len(events) for events in self._waiters.values()) >= self._max_waiters:
                return False
            self._waiters.setdefault(job_id, []).append(ended)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="variflow-job-watcher", daemon=True
                )
                self._thread.start()
        try:
            return ended.wait(timeout)
        finally:
            with self._lock:
                events = self._waiters.get(job_id, [])
                if ended in events:
                    events.remove(ended)
                if not events:
                    self._waiters.pop(job_id, None)

    def _run(self) -> None:
        while True:
            time.sleep(self._tick)  # the caller read the job just before waiting
            with self._lock:
                watched = list(self._waiters)
                if not watched:
                    self._thread = None
                    return
            try:
                found = self._check(watched)
            except Exception:  # the database restarting: the waiters time out meanwhile
                log.warning("checking %d waited jobs failed; again", len(watched), exc_info=True)
                found = None
            if found is not None:
                self._wake_ended(watched, found)

    def _wake_ended(self, watched: list[uuid.UUID], found: dict[uuid.UUID, str]) -> None:
        with self._lock:
            for job_id in watched:
                status = found.get(job_id)
                if status is None or JobStatus(status).is_terminal:
                    for ended in self._waiters.get(job_id, []):
                        ended.set()
