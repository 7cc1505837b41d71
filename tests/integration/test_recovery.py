"""Recovery: a provider's answer survives a database restart, claims and leases are kept
alive by their holder (so they can be short), and a dead holder's job is taken again.

The database restarts happen on a PostgreSQL of the test's own (initdb into a temporary
folder, its own port): the shared server is never touched.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import update

import worker.submit
from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from sandbox.testing import png_bytes, wait_until
from tests.conftest import Configure, unavailable
from tests.integration.test_submit_guarantees import expire_claim
from worker import jobs
from worker.api import get_job, submit_variation
from worker.devservers import PostgresServer
from worker.devstack import sandbox_env
from worker.migrate import upgrade
from worker.models import Job, utcnow
from worker.polling import lease_due, poll_jobs
from worker.runtime import current, session_scope
from worker.status import JobStatus, Source, UpstreamState
from worker.submit import SubmitOutcome, submit
from worker.sweep import sweep

pytestmark = pytest.mark.services

PIAPI = {"origin_task_id": "imagine-1", "index": "1", "prompt": "a red fox"}


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer().init()
    except Exception as exc:  # no server binaries: skipped here, a failure in CI
        unavailable("a private PostgreSQL (initdb)", exc)
        raise
    upgrade(server.url)
    yield server
    server.destroy()


@pytest.fixture
def sandbox(configure: Configure) -> Iterator[SandboxServer]:
    config = SandboxConfig(pending_seconds=30, processing_seconds=30, seed=5)
    yield from _serving(config, configure)


def _serving(config: SandboxConfig, configure: Configure) -> Iterator[SandboxServer]:
    """A sandbox with ``config``, made the providers of the installed runtime."""
    with SandboxServer(config=config) as server:
        configure(
            public_url="http://127.0.0.1:9",
            **{k.removeprefix("VARIFLOW_").lower(): v for k, v in sandbox_env(server.url).items()},
        )
        yield server


@pytest.fixture
def on_own_postgres(own_postgres: PostgresServer, configure: Configure) -> PostgresServer:
    if not own_postgres.is_up():
        own_postgres.start()
    configure(database_url=own_postgres.url)
    with session_scope() as session:
        session.execute(update(Job).values(status="cancelled"))  # earlier tests' jobs: done
    return own_postgres


def _claimed_until(job_id: object) -> datetime | None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.claimed_until


def _create_started(job_id: object) -> bool:
    with session_scope() as session:
        job = session.get(Job, job_id)
        return job is not None and job.create_started_at is not None


def test_an_answer_is_written_once_the_database_is_back(
    on_own_postgres: PostgresServer,
    sandbox: SandboxServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The create takes 2 s upstream; the database goes away while it is in flight.
    sandbox.state.update_config(slow_rate=1.0, slow_seconds=2.0)
    job = submit_variation("piclaza", image=png_bytes(32, 32))
    caplog.set_level(logging.WARNING, logger="worker.submit")
    outcome: list[SubmitOutcome] = []
    submitting = threading.Thread(target=lambda: outcome.append(submit(job.id, current())))
    submitting.start()
    wait_until(lambda: _create_started(job.id))
    on_own_postgres.stop()
    wait_until(lambda: "database unavailable" in caplog.text, timeout=30)
    on_own_postgres.start()
    submitting.join(60)

    assert outcome and outcome[0].carry is None
    done = get_job(job.id)
    assert done.status == "submitted", done.error_message
    assert done.upstream_task_id is not None
    assert sandbox.state.stats()["creates"]["piclaza"] == 1


def test_an_answer_the_worker_cannot_write_is_carried_in_its_retry_message(
    on_own_postgres: PostgresServer,
    sandbox: SandboxServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker.submit, "RECORD_IN_WORKER_FOR", 0.5)
    sandbox.state.update_config(slow_rate=1.0, slow_seconds=1.0)
    job = submit_variation("piclaza", image=png_bytes(32, 32))
    outcome: list[SubmitOutcome] = []
    submitting = threading.Thread(target=lambda: outcome.append(submit(job.id, current())))
    submitting.start()
    wait_until(lambda: _create_started(job.id))
    on_own_postgres.stop()
    submitting.join(60)
    assert outcome and outcome[0].carry is not None
    assert outcome[0].retry_in is not None

    # Still down: the message carries the answer on; back up: it is written.
    again = submit(job.id, current(), carried=outcome[0].carry)
    assert again.carry == outcome[0].carry
    on_own_postgres.start()
    assert submit(job.id, current(), carried=outcome[0].carry).carry is None

    done = get_job(job.id)
    assert done.status == "submitted"
    assert done.upstream_task_id is not None
    assert sandbox.state.stats()["creates"]["piclaza"] == 1


def test_a_claim_is_kept_alive_while_its_create_runs(
    pg_url: str, sandbox: SandboxServer, configure: Configure
) -> None:
    settings = configure(submit_claim_ttl=3)
    sandbox.state.update_config(slow_rate=1.0, slow_seconds=4.0)
    job = submit_variation("piapi", **PIAPI)
    submitting = threading.Thread(target=lambda: submit(job.id, current()))
    submitting.start()
    wait_until(lambda: _create_started(job.id))
    first = _claimed_until(job.id)
    assert first is not None
    # Renewed past its first expiry while the slow create runs ...
    wait_until(lambda: (_claimed_until(job.id) or first) > first + timedelta(seconds=1))
    # ... so the sweep, which runs meanwhile, neither releases nor fails it.
    report = sweep(current())
    assert job.id not in report.released + report.unknown
    submitting.join(30)

    assert get_job(job.id).status == "submitted"
    assert sandbox.state.stats()["creates"]["piapi"] == 1
    assert settings.submit_claim_ttl == 3


def test_a_dead_workers_claim_is_taken_again_soon_after_it_lapses(
    pg_url: str, sandbox: SandboxServer, configure: Configure
) -> None:
    configure(submit_claim_ttl=3)
    job = submit_variation("piapi", **PIAPI)
    assert worker.submit.claim_for_submit(job.id, current()) is not None  # then the worker dies

    # The redelivered message finds the claim held: it looks again when it can lapse.
    held = submit(job.id, current())
    assert held.retry_in is not None and held.retry_in <= 3 + 1

    wait_until(lambda: (_claimed_until(job.id) or utcnow()) < utcnow(), timeout=10)
    assert submit(job.id, current()).retry_in is None
    assert get_job(job.id).status == "submitted"
    assert sandbox.state.stats()["creates"]["piapi"] == 1


def test_a_poll_lease_is_kept_alive_while_the_poll_runs(
    pg_url: str, sandbox: SandboxServer, configure: Configure
) -> None:
    configure(poll_lease=3, poll_backoff_start=0.05)
    job = submit_variation("piclaza", image=png_bytes(32, 32))
    submit(job.id, current())
    with session_scope() as session:
        session.execute(update(Job).values(next_poll_at=utcnow() - timedelta(seconds=1)))
    (batch,) = lease_due(current())
    leased_until = utcnow() + timedelta(seconds=3)
    sandbox.state.update_config(slow_rate=1.0, slow_seconds=4.0)

    renewed: list[bool] = []

    def watch() -> None:
        def beyond_lease() -> bool:
            with session_scope() as session:
                row = session.get(Job, job.id)
                assert row is not None and row.next_poll_at is not None
                return row.next_poll_at > leased_until + timedelta(seconds=0.5)

        wait_until(beyond_lease, timeout=10)
        renewed.append(True)

    watcher = threading.Thread(target=watch)
    watcher.start()
    poll_jobs(batch.provider, batch.job_ids, current())
    watcher.join(15)

    assert renewed == [True]
    assert sandbox.state.stats()["piclaza_batch"]["queries"] == 1
    assert get_job(job.id).status in ("submitted", "processing")


def test_a_create_sent_by_a_worker_that_died_is_never_sent_again(
    pg_url: str, sandbox: SandboxServer, configure: Configure
) -> None:
    configure(submit_claim_ttl=3)
    job = submit_variation("piclaza", image=png_bytes(32, 32))
    claim = worker.submit.claim_for_submit(job.id, current())
    assert claim is not None
    with session_scope() as session:  # the create was sent ... and the worker died
        assert jobs.mark_create_started(session, job.id, claim.token, utcnow())
    expire_claim(job.id)

    # The redelivered message neither creates again nor waits for the claim.
    assert submit(job.id, current()) == worker.submit.NOTHING_TO_DO
    # The first sweep gives a late answer a moment; the next one fails the job.
    first = sweep(current())
    assert job.id not in first.unknown + first.released
    assert any("waiting" in (e.message or "") for e in get_job(job.id).events)
    expire_claim(job.id)
    assert job.id in sweep(current()).unknown

    done = get_job(job.id)
    assert done.status == "failed"
    assert done.error_code == "submit_outcome_unknown"
    assert sandbox.state.stats()["creates"]["piclaza"] == 0


def test_a_holder_that_is_alive_takes_its_lapsed_claim_back(
    pg_url: str, sandbox: SandboxServer, configure: Configure
) -> None:
    # The database was away longer than the claim's life: the sweep marks the claim
    # lapsed, and the holder's next heartbeat shows it is alive after all.
    configure(submit_claim_ttl=3)
    job = submit_variation("piclaza", image=png_bytes(32, 32))
    claim = worker.submit.claim_for_submit(job.id, current())
    assert claim is not None
    with session_scope() as session:
        assert jobs.mark_create_started(session, job.id, claim.token, utcnow())
    expire_claim(job.id)
    assert job.id not in sweep(current()).unknown  # marked lapsed, not failed

    with session_scope() as session:
        assert jobs.renew_claim(session, job.id, claim.token, 3, utcnow())
        # ... and a create is still never marked twice, by anyone.
        assert not jobs.mark_create_started(session, job.id, claim.token, utcnow())
    assert job.id not in sweep(current()).unknown + sweep(current()).released
    assert _claimed_until(job.id) is not None


def test_an_answer_the_database_refuses_fails_the_job_naming_the_task(
    pg_url: str, sandbox: SandboxServer
) -> None:
    job = submit_variation("piclaza", image=png_bytes(32, 32))
    claim = worker.submit.claim_for_submit(job.id, current())
    assert claim is not None
    too_long = "t" * 300  # longer than the upstream_task_id column
    answer = worker.submit.Submission(
        UpstreamState(JobStatus.SUBMITTED, Source.SUBMIT, upstream_task_id=too_long)
    )

    worker.submit._finish(claim, answer, current())

    done = get_job(job.id)
    assert done.status == "failed"
    assert done.error_code == "upstream_error"
    assert "could not be stored" in (done.error_message or "")
    assert "tttt" in (done.error_message or "")


@pytest.fixture
def quick_sandbox(configure: Configure) -> Iterator[SandboxServer]:
    """A sandbox whose tasks end at once (LemonData's create then answers at once)."""
    yield from _serving(SandboxConfig(pending_seconds=0.01, processing_seconds=0.01), configure)


def test_the_claim_marks_the_create_only_when_nothing_is_downloaded_first(
    pg_url: str, quick_sandbox: SandboxServer
) -> None:
    sandbox = quick_sandbox
    # The submit flow's claim: for a provider that takes the stored input as is, the
    # create follows at once, so the claim marks it (one write, not two) ...
    piclaza = submit_variation("piclaza", image=png_bytes(32, 32))
    claim = worker.submit.claim_for_submit(piclaza.id, current(), mark_create=True)
    assert claim is not None and claim.row.create_started_at is not None
    with session_scope() as session:  # ... and it is never marked (or sent) again
        assert not jobs.mark_create_started(session, piclaza.id, claim.token, utcnow())
    # A provider that needs the image bytes may download first: marked separately.
    lemondata = submit_variation("lemondata", image=png_bytes(32, 32), n=1, size="256x256")
    other = worker.submit.claim_for_submit(lemondata.id, current(), mark_create=True)
    assert other is not None and other.row.create_started_at is None
    # Both holders died before their create. The marked job is never sent again (the
    # sweep settles it); the other one is submitted by the next worker.
    for job in (piclaza, lemondata):
        expire_claim(job.id)
        assert submit(job.id, current()) == worker.submit.NOTHING_TO_DO
    creates = sandbox.state.stats()["creates"]
    assert (creates["piclaza"], creates["lemondata"]) == (0, 1)
    assert get_job(lemondata.id).status == "completed"
    assert get_job(piclaza.id).status == "queued"
