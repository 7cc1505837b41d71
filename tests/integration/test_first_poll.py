"""A polled provider with slot limits gets each job's first poll sent with its submission
(worker/submit.py first_poll_in), at the time its plan says, instead of waiting for beat's
next tick: its slot frees only when a poll sees the job end. The poll leases the job
itself, so it and beat's lease never both ask the provider.

Real PostgreSQL, a real Redis broker on a queue of the test's own, and the sandbox.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import update

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from tests.conftest import Configure
from worker import jobs
from worker.api import get_job, submit_variation
from worker.devstack import sandbox_env
from worker.models import Job, utcnow
from worker.polling import poll_jobs
from worker.runtime import current, session_scope
from worker.tasks import submit_job

pytestmark = pytest.mark.services


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    config = SandboxConfig(pending_seconds=0.05, processing_seconds=0.05, seed=3)
    with SandboxServer(config=config) as server:
        yield server


@pytest.fixture
def broker(
    pg_url: str, redis_url: str, configure: Configure, sandbox: SandboxServer
) -> Iterator[redis.Redis]:
    configure(
        public_url="http://127.0.0.1:9",
        poll_backoff_start=0.25,
        queue=f"variflow-first-poll-{uuid.uuid4().hex[:8]}",
        **{k.removeprefix("VARIFLOW_").lower(): v for k, v in sandbox_env(sandbox.url).items()},
    )
    client = redis.Redis.from_url(redis_url)
    yield client
    client.delete(current().settings.queue)


@pytest.fixture
def png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def messages(client: redis.Redis) -> list[dict[str, Any]]:
    """The task messages in the test's queue, oldest first: name, args, kwargs, eta."""
    found = []
    for raw in reversed(client.lrange(current().settings.queue, 0, -1)):
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        headers = message["headers"]
        found.append(
            {"task": headers["task"], "args": args, "kwargs": kwargs, "eta": headers["eta"]}
        )
    return found


def submitted(png: bytes) -> uuid.UUID:
    job = submit_variation("piclaza", image=png)
    submit_job(str(job.id), provider="piclaza")  # what the worker does with its message
    assert get_job(job.id).status == "submitted"
    return job.id


def test_a_slot_limited_polled_job_is_sent_its_first_poll(
    broker: redis.Redis, configure: Configure, png: bytes
) -> None:
    configure(piclaza_max_in_flight=2)
    job_id = submitted(png)
    first_poll = [m for m in messages(broker) if m["task"] == "variflow.poll_batch"]
    assert len(first_poll) == 1
    assert first_poll[0]["args"] == ["piclaza", [str(job_id)]]
    assert first_poll[0]["kwargs"] == {"lease_first": True}
    assert first_poll[0]["eta"] is not None  # at the plan's first poll, not at once


def test_without_slot_limits_beat_leases_the_first_poll(broker: redis.Redis, png: bytes) -> None:
    submitted(png)
    assert [m["task"] for m in messages(broker)] == ["variflow.submit_job"]


def test_the_first_poll_leases_its_job_and_leaves_one_beat_holds(
    broker: redis.Redis, configure: Configure, png: bytes, sandbox: SandboxServer
) -> None:
    configure(piclaza_max_in_flight=2)
    mine, beats = submitted(png), submitted(png)
    now = utcnow()
    with session_scope() as session:  # both due; beat has leased one of them
        session.execute(update(Job).values(next_poll_at=now - timedelta(seconds=1)))
        session.execute(
            update(Job).where(Job.id == beats).values(next_poll_at=now + timedelta(seconds=30))
        )

    def polled() -> int:
        return int(sandbox.state.stats()["piclaza_batch"]["ids"])

    before = polled()
    poll_jobs("piclaza", [beats], current(), lease_first=True)
    assert polled() == before  # beat holds it: not asked twice
    poll_jobs("piclaza", [mine], current(), lease_first=True)
    assert polled() == before + 1
    with session_scope() as session:  # beat's lease still holds its job
        assert jobs.lease_these(session, [beats], lease=timedelta(seconds=30), now=now) == []
