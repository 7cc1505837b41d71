"""Beat's work, made to happen: concurrent polling never polls a job twice in a cycle,
Retry-After pushes a provider back, and the sweep repairs lost messages, dead
claims and overdue jobs."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from tests.conftest import Configure, runtime_of
from tests.integration.test_submit_guarantees import PIAPI, at_once, expire_claim, wait_until
from worker.api import cancel_job, get_job, submit_variation
from worker.devstack import sandbox_env
from worker.models import Job, utcnow
from worker.polling import lease_due, poll_jobs, push_back_provider
from worker.runtime import current, session_scope
from worker.submit import claim_for_submit
from worker.sweep import sweep
from worker.tasks import finalize_job, submit_job

pytestmark = pytest.mark.services


@pytest.fixture
def sandbox(configure: Configure) -> Iterator[SandboxServer]:
    config = SandboxConfig(pending_seconds=0.05, processing_seconds=0.05, seed=3)
    with SandboxServer(config=config) as server:
        configure(
            public_url="http://127.0.0.1:9",
            poll_backoff_start=0.05,
            **{k.removeprefix("VARIFLOW_").lower(): v for k, v in sandbox_env(server.url).items()},
        )
        yield server


def _submitted_piclaza_jobs(n: int, image: bytes) -> list[str]:
    ids = []
    for _ in range(n):
        job = submit_variation("piclaza", image=image)
        submit_job(str(job.id), provider="piclaza")
        ids.append(str(job.id))
    return ids


def _make_due() -> None:
    with session_scope() as session:
        session.execute(update(Job).values(next_poll_at=utcnow() - timedelta(seconds=1)))


@pytest.fixture
def png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_two_pollers_at_once_never_lease_one_job_twice(
    pg_url: str, redis_url: str, sandbox: SandboxServer, png: bytes, configure: Configure
) -> None:
    settings = configure(poll_batch_limit=7)
    ids = _submitted_piclaza_jobs(30, png)
    _make_due()

    leased: list[list[str]] = []
    lock = threading.Lock()

    def poller() -> None:
        mine = []
        while batches := lease_due(runtime_of(settings)):
            mine += [str(i) for b in batches for i in b.job_ids]
        with lock:
            leased.append(mine)

    at_once(3, poller)

    everything = [i for mine in leased for i in mine]
    assert sorted(everything) == sorted(ids), "every due job leased exactly once"
    assert sum(1 for mine in leased if mine) >= 2, "the pollers shared the work"


def test_a_poll_cycle_makes_one_request_per_batch_and_completes_jobs(
    pg_url: str, redis_url: str, sandbox: SandboxServer, png: bytes, configure: Configure
) -> None:
    settings = configure(piclaza_batch_size=4)
    ids = _submitted_piclaza_jobs(10, png)
    wait_until(lambda: all(t.status == "completed" for t in sandbox.state.tasks()), timeout=10)
    _make_due()
    before = sandbox.state.stats()["piclaza_batch"]["queries"]

    for batch in lease_due(runtime_of(settings)):
        poll_jobs(batch.provider, batch.job_ids, runtime_of(settings))

    assert sandbox.state.stats()["piclaza_batch"]["queries"] - before == 3  # ceil(10 / 4)
    assert {get_job(i).status for i in ids} == {"completed"}


def test_retry_after_pushes_every_job_of_the_provider_back(
    pg_url: str, redis_url: str, sandbox: SandboxServer, png: bytes, configure: Configure
) -> None:
    settings = configure(piclaza_batch_size=2)
    _submitted_piclaza_jobs(6, png)
    _make_due()
    sandbox.state.update_config(rate_limit_all=True, retry_after_seconds=30)

    for batch in lease_due(runtime_of(settings)):
        poll_jobs(batch.provider, batch.job_ids, runtime_of(settings))

    with session_scope() as session:
        next_polls = list(session.scalars(select(Job.next_poll_at)))
    assert all(t is not None and t > utcnow() + timedelta(seconds=25) for t in next_polls)
    assert push_back_provider("piclaza", 1, current()) == 0  # nothing is due earlier than that now


def test_sweep_resends_a_job_whose_message_was_lost(
    pg_url: str, configure: Configure, sandbox: SandboxServer
) -> None:
    configure(broker_url="redis://127.0.0.1:1/0")  # the message is lost at submit
    job = submit_variation("piapi", **PIAPI)
    settings = configure(lost_message_grace=0)

    report = sweep(runtime_of(settings))

    assert report.resent == [job.id]
    assert any("sent again" in (e.message or "") for e in get_job(job.id).events)


def test_sweep_releases_a_dead_workers_claim(
    pg_url: str, redis_url: str, configure: Configure, sandbox: SandboxServer
) -> None:
    # The task stays pending upstream: on a busy machine a 0.05 s task could already be
    # finished when the sandbox answers the create, and the job would complete at once.
    sandbox.state.update_config(pending_seconds=60)
    settings = configure()
    job = submit_variation("piapi", **PIAPI)
    assert claim_for_submit(job.id, runtime_of(settings)) is not None  # the worker dies holding it
    expire_claim(job.id)

    assert job.id in sweep(runtime_of(settings)).released
    submit_job(str(job.id), provider="piapi")  # what the re-sent message does

    # Accepted upstream (the sandbox may already say "processing" on a busy machine).
    assert get_job(job.id).status in ("submitted", "processing")
    assert any("claim expired" in (e.message or "") for e in get_job(job.id).events)


def test_sweep_fails_an_overdue_job_with_timeout(
    pg_url: str, redis_url: str, sandbox: SandboxServer, configure: Configure
) -> None:
    sandbox.state.update_config(pending_seconds=60)
    job = submit_variation("piapi", deadline=0.5, **PIAPI)
    submit_job(str(job.id), provider="piapi")
    assert get_job(job.id).status == "submitted"

    wait_until(lambda: job.id in sweep(runtime_of(configure())).timed_out)

    done = get_job(job.id)
    assert done.status == "failed"
    assert done.error_code == "timeout"


def test_a_timed_out_job_is_cancelled_upstream_until_finalize_finishes(
    pg_url: str, redis_url: str, sandbox: SandboxServer, configure: Configure
) -> None:
    sandbox.state.update_config(pending_seconds=60)
    job = submit_variation("piapi", deadline=0.5, **PIAPI)
    submit_job(str(job.id), provider="piapi")
    wait_until(lambda: job.id in sweep(runtime_of(configure())).timed_out)

    # Its finalize message was lost: the sweep keeps offering it ...
    assert job.id in sweep(runtime_of(configure(lost_message_grace=0))).refinalize
    # ... and running it stops the paid task upstream and ends the after-work.
    finalize_job(str(job.id))

    assert [t.cancelled for t in sandbox.state.tasks()] == [True]
    assert any("cancelled upstream" in (e.message or "") for e in get_job(job.id).events)
    assert job.id not in sweep(runtime_of(configure(lost_message_grace=0))).refinalize


def test_jobs_waiting_for_slots_keep_the_polls_of_the_slot_holders_steady(
    pg_url: str, redis_url: str, sandbox: SandboxServer, png: bytes, configure: Configure
) -> None:
    """A polled provider's slot frees only when its job's end is polled: while jobs wait
    for the slot, polls do not back off (a backed-off poll would leave it idle)."""
    settings = configure(
        piclaza_max_in_flight=1, poll_backoff_start=1, poll_backoff_factor=4, poll_backoff_cap=600
    )
    # Started at once and slow: no poll of the test sees a change (a change resets the
    # backoff, which would hide the difference asserted below).
    sandbox.state.update_config(pending_seconds=0, processing_seconds=600)
    holder, waiting = _submitted_piclaza_jobs(2, png)
    assert get_job(waiting).waiting_reason == "waiting for a slot: 1/1 in flight on piclaza/main"

    def poll_after(attempts: int) -> float:
        """Seconds until the holder's next poll, after a poll that found no change."""
        with session_scope() as session:
            session.execute(
                update(Job)
                .where(Job.id == uuid.UUID(holder))
                .values(poll_attempts=attempts, next_poll_at=utcnow() - timedelta(seconds=1))
            )
        for batch in lease_due(runtime_of(settings)):
            poll_jobs(batch.provider, batch.job_ids, runtime_of(settings))
        with session_scope() as session:
            job = session.get(Job, uuid.UUID(holder))
            assert job is not None and job.next_poll_at is not None
            return (job.next_poll_at - utcnow()).total_seconds()

    assert poll_after(4) <= 1  # the first interval, however long the job has run
    cancel_job(waiting)
    assert poll_after(4) > 100  # nobody waits: back off as usual (1 x 4**5, capped)
