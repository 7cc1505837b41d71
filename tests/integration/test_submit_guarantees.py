"""What a paying user relies on: one job per idempotency key, one upstream create per
job, nothing lost when the broker is down, nothing stuck when a worker dies."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, TypeVar

import pytest
from sqlalchemy import func, select

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from tests.conftest import Configure, runtime_of
from worker.api import get_job, submit_variation
from worker.devstack import sandbox_env
from worker.models import Job, utcnow
from worker.runtime import current, session_scope
from worker.submit import claim_for_submit, submit
from worker.sweep import sweep
from worker.tasks import submit_job

pytestmark = pytest.mark.services
T = TypeVar("T")
PIAPI = {"origin_task_id": "imagine-9", "index": "4", "prompt": "a yellow bird"}


def at_once(n: int, fn: Callable[[], T]) -> list[T]:
    """Run fn in n threads released together."""
    barrier = threading.Barrier(n)

    def run() -> T:
        barrier.wait()
        return fn()

    with ThreadPoolExecutor(n) as pool:
        return [f.result() for f in [pool.submit(run) for _ in range(n)]]


@pytest.fixture
def sandbox(configure: Configure) -> Iterator[SandboxServer]:
    with SandboxServer(config=SandboxConfig(pending_seconds=5, processing_seconds=5)) as server:
        configure(
            public_url="http://127.0.0.1:9",
            **{k.removeprefix("VARIFLOW_").lower(): v for k, v in sandbox_env(server.url).items()},
        )
        yield server


def _job_count() -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def test_same_idempotency_key_at_the_same_moment_makes_one_job(pg_url: str, redis_url: str) -> None:
    jobs = at_once(8, lambda: submit_variation("piapi", idempotency_key="order-42", **PIAPI))

    assert len({job.id for job in jobs}) == 1
    assert _job_count() == 1


def test_two_workers_submitting_one_job_create_one_upstream_task(
    pg_url: str, redis_url: str, sandbox: SandboxServer
) -> None:
    job = submit_variation("piapi", **PIAPI)

    # The flow a submit_job task runs (the loser may schedule a look at the claim
    # later, which a direct task call would raise as Retry).
    at_once(2, lambda: submit(job.id, current()))

    assert sandbox.state.stats()["creates"]["piapi"] == 1
    stored = get_job(job.id)
    assert stored.status == "submitted"
    claims = [e for e in stored.events if e.message and e.message.startswith("claimed")]
    assert len(claims) == 1


def test_broker_down_at_submit_keeps_the_job(
    pg_url: str, configure: Configure, caplog: pytest.LogCaptureFixture
) -> None:
    configure(broker_url="redis://127.0.0.1:1/0")  # nothing listens there
    caplog.set_level(logging.WARNING)

    job = submit_variation("piapi", **PIAPI)

    assert job.status == "queued"
    assert get_job(job.id).status == "queued"
    assert "the sweep will send it again" in caplog.text
    # The hook the sweep uses: this job is due to be sent again.
    assert job.id in sweep(runtime_of(configure(lost_message_grace=0))).resent


def test_an_expired_claim_lets_another_worker_submit(
    pg_url: str, redis_url: str, sandbox: SandboxServer, configure: Configure
) -> None:
    settings = configure()
    job = submit_variation("piapi", **PIAPI)
    first = claim_for_submit(job.id, runtime_of(settings))  # a worker claims it ... and dies here
    assert first is not None
    assert claim_for_submit(job.id, runtime_of(settings)) is None  # the claim holds meanwhile

    expire_claim(job.id)  # VARIFLOW_SUBMIT_CLAIM_TTL passes
    submit_job(str(job.id), provider="piapi")

    stored = get_job(job.id)
    assert stored.status == "submitted"
    assert sandbox.state.stats()["creates"]["piapi"] == 1


def expire_claim(job_id: object) -> None:
    """Move a job's submit claim into the past, as if its TTL had run out."""
    with session_scope() as session:
        row = session.get(Job, job_id)
        assert row is not None and row.claimed_until is not None
        row.claimed_until = utcnow() - timedelta(seconds=1)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
