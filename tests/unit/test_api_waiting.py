"""The per-process watcher behind ``GET /v1/jobs/{id}?wait=`` (webhooks/v1/waiting.py)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Collection

from webhooks.v1.waiting import Watcher


class Statuses:
    """What the database would say, and how often it was asked (in one query each)."""

    def __init__(self) -> None:
        self.now: dict[uuid.UUID, str] = {}
        self.queries: list[frozenset[uuid.UUID]] = []
        self.fail_next = 0
        self.asked = threading.Event()

    def __call__(self, ids: Collection[uuid.UUID]) -> dict[uuid.UUID, str]:
        self.queries.append(frozenset(ids))
        self.asked.set()
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("database restarting")
        return {job_id: self.now[job_id] for job_id in ids if job_id in self.now}


def wait_in_thread(watcher: Watcher, job_id: uuid.UUID, results: list[bool]) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(watcher.wait(job_id, 60)))
    thread.start()
    # Until the wait is registered (or already over: a fast watcher may end it first).
    while job_id not in watcher.watched() and thread.is_alive():
        threading.Event().wait(0.001)
    return thread


def test_waiters_wake_when_their_job_ends_and_not_before() -> None:
    statuses = Statuses()
    watcher = Watcher(statuses, max_waiters=8, tick=0.001)
    a, b = uuid.uuid4(), uuid.uuid4()
    statuses.now = {a: "processing", b: "queued"}
    results: list[bool] = []
    threads = [wait_in_thread(watcher, a, results), wait_in_thread(watcher, b, results)]
    statuses.asked.clear()
    statuses.asked.wait(10)
    assert threads[0].is_alive() and threads[1].is_alive()
    statuses.now[a] = "completed"
    threads[0].join(10)
    assert results == [True] and threads[1].is_alive()
    statuses.now[b] = "cancelled"
    threads[1].join(10)
    assert results == [True, True]
    # Both jobs were checked together while both were waited for.
    assert frozenset({a, b}) in statuses.queries
    assert watcher.watched() == frozenset()


def test_a_job_that_disappears_wakes_its_waiter() -> None:
    statuses = Statuses()
    watcher = Watcher(statuses, max_waiters=8, tick=0.001)
    results: list[bool] = []
    wait_in_thread(watcher, uuid.uuid4(), results).join(10)
    assert results == [True]


def test_a_failing_check_is_retried_and_a_timeout_is_false() -> None:
    statuses = Statuses()
    watcher = Watcher(statuses, max_waiters=8, tick=0.001)
    job_id = uuid.uuid4()
    statuses.now = {job_id: "queued"}
    statuses.fail_next = 3
    results: list[bool] = []
    thread = wait_in_thread(watcher, job_id, results)
    while len(statuses.queries) < 5:  # three failures, then answers again
        threading.Event().wait(0.001)
    assert thread.is_alive()
    statuses.now[job_id] = "failed"
    thread.join(10)
    assert results == [True]
    still = uuid.uuid4()
    statuses.now[still] = "processing"
    assert watcher.wait(still, 0.01) is False  # never ends: the timeout answers


def test_beyond_max_waiters_a_wait_answers_at_once() -> None:
    # The threads of a web process are not all given to waiters: the rest answer at once.
    statuses = Statuses()
    watcher = Watcher(statuses, max_waiters=2, tick=0.001)
    jobs = [uuid.uuid4() for _ in range(3)]
    statuses.now = dict.fromkeys(jobs, "queued")
    results: list[bool] = []
    threads = [wait_in_thread(watcher, job_id, results) for job_id in jobs[:2]]
    assert watcher.wait(jobs[2], 60) is False  # not held: two wait already
    assert jobs[2] not in watcher.watched()
    for job_id in jobs[:2]:
        statuses.now[job_id] = "completed"
    for thread in threads:
        thread.join(10)
    assert results == [True, True]
