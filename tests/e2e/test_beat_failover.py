"""Two real `celery -A worker.celery_app beat` processes on PostgreSQL + Redis, each with a
VARIFLOW_HOME of its own: one sends, the other stands by; the leader is killed with
SIGKILL, the standby takes the lease within the documented bound and scheduled work
goes on, and no (entry, period) is ever sent twice, read from the messages themselves
(each carries its period and its sender in headers)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import delete, select

from tests.conftest import Configure
from worker.beat_scheduler import PERIOD_HEADER, SENDER_HEADER
from worker.celery_app import POLL_DUE, SWEEP
from worker.devstack import Stack
from worker.models import BeatEntry, BeatLease
from worker.runtime import current

pytestmark = [pytest.mark.services, pytest.mark.e2e]

TTL = 3.0  # VARIFLOW_BEAT_LEASE_TTL: each beat checks the lease every second
STARTUP_TIMEOUT = 90.0  # two Celery processes importing at once, on a busy machine
SENT_BY_EACH = 3  # messages of each task seen from a beat before the test moves on


@dataclass(frozen=True)
class Sent:
    task: str
    period: datetime
    sender: str


@dataclass
class Beats:
    stacks: list[Stack]
    queue: redis.Redis[bytes]
    queue_name: str

    def wait_for(self, check: Callable[[], Any], what: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                logs = "\n".join(self.log(s)[-3000:] for s in self.stacks)
                raise AssertionError(f"timed out waiting for {what}:\n{logs}")
            time.sleep(0.05)

    @staticmethod
    def log(stack: Stack) -> str:
        path = stack.log_dir / "beat.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def ids(self, role: str) -> dict[str, Stack]:
        """The beats that logged ``role`` ("leads" / "standing by"), by their id."""
        found = {}
        for stack in self.stacks:
            for beat_id in re.findall(rf"beat (\S+) {role}", self.log(stack)):
                found[beat_id] = stack
        return found

    def sent(self) -> list[Sent]:
        """Every message beat sent, oldest first (nothing consumes the queue)."""
        messages = [json.loads(raw) for raw in reversed(self.queue.lrange(self.queue_name, 0, -1))]
        return [
            Sent(
                m["headers"]["task"],
                datetime.fromisoformat(m["headers"][PERIOD_HEADER]),
                m["headers"][SENDER_HEADER],
            )
            for m in messages
        ]

    def sent_by(self, sender: str) -> list[Sent]:
        return [s for s in self.sent() if s.sender == sender]

    def sent_both_tasks(self, sender: str) -> bool:
        tasks = [s.task for s in self.sent_by(sender)]
        return all(tasks.count(t) >= SENT_BY_EACH for t in (POLL_DUE, SWEEP))


def lease() -> BeatLease | None:
    with current().db.session() as session:
        found: BeatLease | None = session.scalar(select(BeatLease))
        return found


@pytest.fixture
def beats(pg_url: str, redis_url: str, configure: Configure, tmp_path: Path) -> Iterator[Beats]:
    settings = configure(poll_interval=0.25, sweep_interval=0.5, beat_lease_ttl=TTL)
    with current().db.session() as session:  # the session's database: no earlier lease
        session.execute(delete(BeatLease))
        session.execute(delete(BeatEntry))
    env = {k: v for k, v in os.environ.items() if k.startswith("VARIFLOW_")}
    stacks = [
        Stack({**env, "VARIFLOW_HOME": str(tmp_path / name)}, tmp_path / name / "logs")
        for name in ("host-1", "host-2")
    ]
    queue = redis.Redis.from_url(redis_url)
    try:
        yield Beats(stacks, queue, settings.queue)
    finally:
        for stack in stacks:
            stack.stop()
        queue.delete(settings.queue)
        queue.close()


def test_the_standby_takes_over_from_a_killed_leader_and_no_period_runs_twice(
    beats: Beats,
) -> None:
    for stack in beats.stacks:
        stack.start_beat()
    leaders = beats.wait_for(lambda: beats.ids("leads"), "a beat to lead", STARTUP_TIMEOUT)
    standbys = beats.wait_for(lambda: beats.ids("standing by"), "a standby", STARTUP_TIMEOUT)
    ((first, leader_stack),) = leaders.items()
    ((second, standby_stack),) = standbys.items()
    assert leader_stack is not standby_stack
    beats.wait_for(lambda: beats.sent_both_tasks(first), "the leader's sends", 30)

    # The leader dies without a word: no release, its lease must expire.
    proc = leader_stack.procs.pop("beat")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    held = lease()
    assert held is not None and held.holder == first
    assert second not in {s.sender for s in beats.sent()}  # a standby sends nothing

    beats.wait_for(lambda: second in beats.ids("leads"), "the standby to lead", 30)
    taken = lease()
    assert taken is not None and taken.holder == second
    # Never a live lease. (That it is taken within TTL + one check of the last renewal
    # is proven with a fake clock in tests/integration/test_beat_lease.py: a bound
    # on real time here would fail on a busy machine.)
    assert taken.acquired_at >= held.expires_at
    beats.wait_for(lambda: beats.sent_both_tasks(second), "the new leader's sends", 30)
    standby_stack.stop()  # a clean stop releases the lease: it expires at once
    released = lease()
    assert released is not None
    assert released.expires_at < released.renewed_at + timedelta(seconds=TTL)

    sent = beats.sent()
    assert {s.sender for s in sent} == {first, second}
    periods = [(s.task, s.period) for s in sent]
    assert len(periods) == len(set(periods)), "an (entry, period) was sent twice"
    for task in (POLL_DUE, SWEEP):
        by_first = [s.period for s in sent if s.task == task and s.sender == first]
        by_second = [s.period for s in sent if s.task == task and s.sender == second]
        assert max(by_first) < min(by_second)  # the new leader went on where the old stopped
