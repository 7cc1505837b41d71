"""A new job behind a line of waiting jobs waits at once, and is sent no message
(worker/api.py, jobs.wait_in_line): a burst of thousands of jobs then costs the workers
nothing until slots free, and the line's wakes reach each job in turn.

Real databases (SQLite and PostgreSQL) and a real Redis broker on a queue of the test's
own, whose length says which jobs were sent a submit message.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import redis
from sqlalchemy.exc import OperationalError

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from tests.conftest import Configure
from worker import capacity, jobs
from worker.api import get_job, submit_variation
from worker.devstack import sandbox_env
from worker.models import Job, utcnow
from worker.runtime import current, session_scope
from worker.tasks import submit_job

PIAPI = {"origin_task_id": "imagine-9", "index": "4", "prompt": "a yellow bird"}
HEAD_REASON = "waiting for a slot: 1/1 in flight on piapi/main"


@pytest.fixture(params=["sqlite_url", pytest.param("pg_url", marks=pytest.mark.services)])
def broker(request: pytest.FixtureRequest, redis_url: str, configure: Configure) -> redis.Redis:
    request.getfixturevalue(request.param)
    settings = configure(broker_url=redis_url, queue=f"variflow-line-{uuid.uuid4().hex[:8]}")
    configure(piapi_max_in_flight=1)
    client = redis.Redis.from_url(redis_url)
    client.delete(settings.queue)
    return client


def sent(client: redis.Redis) -> int:
    """Submit messages waiting in the test's queue."""
    return int(client.llen(current().settings.queue))


def waits(job_id: uuid.UUID) -> None:
    """What admission leaves on a job it made wait."""
    with session_scope() as session:
        assert jobs.set_waiting(session, job_id, HEAD_REASON, utcnow())


def test_a_job_behind_waiting_ones_waits_at_once_without_a_message(broker: redis.Redis) -> None:
    first = submit_variation("piapi", **PIAPI)
    assert first.waiting_reason is None and sent(broker) == 1  # an empty line: admission decides
    waits(first.id)

    behind = submit_variation("piapi", **PIAPI)
    assert sent(broker) == 1  # no message: the line's wakes reach it
    # Why the line does not move: the first waiting job's reason.
    assert behind.waiting_reason == HEAD_REASON
    assert [event.message for event in behind.events] == ["accepted", HEAD_REASON]
    with session_scope() as session:
        row = session.get(Job, behind.id)
        assert row is not None and row.waiting_reason == HEAD_REASON

    # Higher priority jumps the line: admission decides, as for an empty line.
    urgent = submit_variation("piapi", priority=5, **PIAPI)
    assert urgent.waiting_reason is None and sent(broker) == 2

    # The line's wakes reach the jobs in turn: the first, then the one behind it.
    with session_scope() as session:
        accounts = current().providers.accounts("piapi")
        assert capacity.to_wake(session, accounts, utcnow()) == [first.id]
        assert capacity.wake_next(session, "piapi", 5, utcnow(), but=first.id) == [behind.id]


def test_a_provider_without_limits_has_no_line(broker: redis.Redis) -> None:
    image = {"image_url": "https://example.com/cat.png"}
    first = submit_variation("piclaza", **image)
    waits(first.id)  # a row left waiting by an earlier configuration
    later = submit_variation("piclaza", **image)
    assert later.waiting_reason is None and sent(broker) == 2


def test_a_job_whose_line_went_while_it_joined_is_sent_its_message(broker: redis.Redis) -> None:
    """The job ahead is admitted, and its wake finds nobody, in the instant the new job
    joins: the new job is then sent its own message rather than left until the sweep."""
    first = submit_variation("piapi", **PIAPI)
    waits(first.id)
    with session_scope() as session:
        job = session.get(Job, first.id)
        assert job is not None
        ahead = Job(id=uuid.uuid4(), provider="piapi", priority=0)
        assert jobs.still_behind(session, ahead, utcnow())
        job.claim_token, job.claimed_until = "t", utcnow() + timedelta(seconds=30)
    with session_scope() as session:
        assert not jobs.still_behind(session, ahead, utcnow())


def test_under_the_fail_policy_every_job_is_asked(
    broker: redis.Redis, configure: Configure
) -> None:
    configure(piapi_max_in_flight=1, budget_policy="fail")
    first = submit_variation("piapi", **PIAPI)
    waits(first.id)
    later = submit_variation("piapi", **PIAPI)
    assert later.waiting_reason is None and sent(broker) == 2


def test_an_error_waking_the_line_never_undoes_an_admission(
    broker: redis.Redis,
    configure: Configure,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The wake after an admission runs once the claim is committed: an error there (a
    deadlock, a restart) must not stop the create, or the job would be left claimed and
    unsent until the sweep failed it as an unknown outcome."""
    with SandboxServer(config=SandboxConfig(seed=5)) as sandbox:
        configure(
            piclaza_max_in_flight=2,  # a free slot beyond this job: admission wakes the next
            **{k.removeprefix("VARIFLOW_").lower(): v for k, v in sandbox_env(sandbox.url).items()},
        )

        def broken(*_: object, **__: object) -> list[uuid.UUID]:
            raise OperationalError("UPDATE jobs", {}, Exception("deadlock detected"))

        monkeypatch.setattr(capacity, "wake_next", broken)
        job = submit_variation("piclaza", image_url="https://example.com/cat.png")
        submit_job(str(job.id), provider="piclaza")
        assert sandbox.state.stats()["creates"]["piclaza"] == 1
    assert get_job(job.id).status == "submitted"
    assert "could not wake piclaza's queue" in caplog.text
