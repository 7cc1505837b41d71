"""Celery tasks. Thin: load the row, call the adapter, apply the transition.

Tasks take job ids, never objects, and may run more than once (acks_late):
each one re-reads the database and does nothing when there is nothing to do.
"""

from __future__ import annotations

import logging
import random
import secrets
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import or_, update

from worker.celery_app import app
from worker.config import Settings, get_settings
from worker.db import session_scope
from worker.finalize import archive, notify
from worker.hooks import TerminalJob, on_terminal
from worker.images import InputImageError, fetch_image
from worker.jobs import apply_update, lock_job, record_event
from worker.models import Job, JobInput, utcnow
from worker.polling import POLL_LEASE, first_poll_at, lease_due, poll_jobs
from worker.providers import get_provider
from worker.providers.base import (
    InputImage,
    PermanentUpstreamError,
    PollTarget,
    Provider,
    Submission,
    SubmitRequest,
    TransientUpstreamError,
    UpstreamError,
)
from worker.providers.http import get_client
from worker.results import store_inline
from worker.states import JobStatus, Source, UpstreamState
from worker.sweep import NOT_RESENT, OUTCOME_UNKNOWN, TIMEOUT, sweep
from worker.webhook_secrets import hash_secret

log = logging.getLogger(__name__)

# A message that arrives a moment before its retry is due still counts.
MAX_LEASES_PER_RUN = 50
RETRY_TOLERANCE = timedelta(seconds=1)


def send_submit(job_id: uuid.UUID, provider: str) -> bool:
    """Nudge a worker to submit a job. The row is already committed, so a failed
    send loses nothing: the sweep re-sends queued jobs whose message was lost."""
    try:
        submit_job.apply_async(
            args=(str(job_id),),
            kwargs={"provider": provider},
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception as exc:  # kombu/redis raise many types; none may lose the job
        log.warning(
            "job %s is queued but its submit message could not be sent (%s: %s); "
            "the sweep will send it again",
            job_id,
            type(exc).__name__,
            exc,
            extra={"job_id": str(job_id), "provider": provider},
        )
        return False
    return True


@dataclass(frozen=True)
class Claim:
    job_id: uuid.UUID
    provider: str
    token: str
    attempt: int
    params: dict[str, Any]
    deadline: datetime
    webhook_secret: str
    image: InputImage | None


def claim_for_submit(job_id: uuid.UUID, settings: Settings) -> Claim | None:
    """Make this worker the job's only submitter, or return None.

    One conditional UPDATE decides between concurrent workers (the database
    serialises it); the claim expires after ``submit_claim_ttl`` so a worker
    that dies holding it does not strand the job.
    """
    now = utcnow()
    token = secrets.token_hex(16)
    # A fresh secret per attempt: webhooks from an abandoned earlier create
    # cannot authenticate as this job's task.
    webhook_secret = secrets.token_urlsafe(32)
    with session_scope() as session:
        claimed = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.status == JobStatus.QUEUED.value,
                or_(Job.claimed_until.is_(None), Job.claimed_until < now),
                or_(Job.retry_at.is_(None), Job.retry_at <= now + RETRY_TOLERANCE),
            )
            .values(
                claim_token=token,
                claimed_until=now + timedelta(seconds=settings.submit_claim_ttl),
                submit_attempts=Job.submit_attempts + 1,
                webhook_secret_hash=hash_secret(webhook_secret),
                retry_at=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return None
        job = session.get(Job, job_id, populate_existing=True)
        assert job is not None
        record_event(
            session, job, Source.SUBMIT, f"claimed for submission (attempt {job.submit_attempts})"
        )
        stored = session.get(JobInput, job_id)
        image = InputImage(stored.content, stored.filename, stored.content_type) if stored else None
        return Claim(
            job_id=job.id,
            provider=job.provider,
            token=token,
            attempt=job.submit_attempts,
            params=dict(job.params),
            deadline=job.deadline,
            webhook_secret=webhook_secret,
            image=image,
        )


@app.task(name="variflow.submit_job", bind=True, max_retries=None)
def submit_job(self: Any, job_id: str, provider: str = "") -> None:
    """Create the job's task upstream, exactly once per claim.

    A create whose outcome is unknown (sent, but no clear answer) is never sent
    again: paying twice is worse than failing clearly. See _outcome_unknown.
    """
    settings = get_settings()
    claim = claim_for_submit(uuid.UUID(job_id), settings)
    if claim is None:
        log.info("job %s: nothing to submit (not queued, claimed, or not yet due)", job_id)
        return
    if claim.deadline <= utcnow():
        _finish(claim, _failure("timeout", "deadline passed before the job was submitted"))
        return
    if claim.attempt > settings.submit_max_retries + 1:
        _finish(claim, _failure("submit_failed", f"gave up after {claim.attempt - 1} attempts"))
        return
    adapter = get_provider(claim.provider)
    request = SubmitRequest(
        job_id=claim.job_id,
        params=claim.params,
        webhook_url=(
            f"{settings.public_base}/webhooks/{claim.provider}/{claim.job_id}"
            if adapter.supports_webhook
            else None
        ),
        webhook_secret=claim.webhook_secret if adapter.supports_webhook else None,
        image=claim.image,
    )
    try:
        if adapter.needs_image_bytes and request.image is None:
            request = replace(request, image=_fetch_input(adapter, claim, settings))
        if not _mark_create_started(claim):
            return  # the claim was lost meanwhile
        submission = adapter.submit(request)
    except PermanentUpstreamError as exc:
        _finish(claim, _failure(exc.code, exc.message))
        return
    except TransientUpstreamError as exc:
        if exc.maybe_processed:
            _outcome_unknown(claim, adapter, exc.message, settings)
            return
        delay = _retry_or_fail(claim, exc, settings)
    except UpstreamError as exc:
        delay = _retry_or_fail(claim, exc, settings)
    except (Exception, SoftTimeLimitExceeded) as exc:
        # Raised around the create call: it may or may not have happened.
        log.exception("job %s: unexpected error while submitting", job_id)
        _outcome_unknown(claim, adapter, f"internal error: {exc!r}", settings)
        return
    else:
        _finish(claim, _store_inline_results(claim, submission, settings))
        return
    if delay is not None:
        raise self.retry(countdown=delay)


def _mark_create_started(claim: Claim) -> bool:
    """Commit, before the create call, that one may be in flight (the sweep reads it)."""
    with session_scope() as session:
        marked = session.execute(
            update(Job)
            .where(Job.id == claim.job_id, Job.claim_token == claim.token)
            .values(create_started_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        return bool(marked.rowcount)  # type: ignore[attr-defined]


def _store_inline_results(claim: Claim, submission: Submission, settings: Settings) -> Submission:
    """Keep images a provider returned inline; a failure here must not re-POST a paid create."""
    try:
        return replace(submission, state=store_inline(settings, claim.job_id, submission.state))
    except OSError as exc:
        log.exception("job %s: could not store inline results", claim.job_id)
        return _failure("result_storage_failed", f"could not store the result images: {exc}")


def _outcome_unknown(claim: Claim, adapter: Provider, reason: str, settings: Settings) -> None:
    """The create may have happened upstream. Never send it again.

    A webhook provider calls back to this job's URL with this claim's secret
    if the task exists, and the receiver adopts it; so the claim (and secret)
    is kept for the webhook grace period, after which the sweep fails the job.
    Other providers offer no way to find the task: the job fails now.
    """
    if not adapter.supports_webhook:
        _finish(claim, _failure(OUTCOME_UNKNOWN, f"{reason}; {NOT_RESENT}"))
        return
    with session_scope() as session:
        job = lock_job(session, claim.job_id)
        if job is None or job.claim_token != claim.token:
            return
        wait = settings.webhook_grace(adapter.name)
        job.claimed_until = utcnow() + timedelta(seconds=wait)
        record_event(
            session,
            job,
            Source.SUBMIT,
            f"{reason}; the task may exist upstream: waiting {wait:g}s for its webhook",
        )


def _fetch_input(adapter: Provider, claim: Claim, settings: Settings) -> InputImage:
    """Download the job's image URL for a provider that needs the file, and check it."""
    image = fetch_image(claim.params["image_url"], settings, get_client())
    others = {k: v for k, v in claim.params.items() if k != "image_url"}
    try:
        adapter.validate(others, image)
    except ValueError as exc:
        raise InputImageError(f"the image at the URL is not usable: {exc}") from None
    return image


def _failure(code: str, message: str) -> Submission:
    return Submission(
        state=UpstreamState(JobStatus.FAILED, Source.SUBMIT, error_code=code, error_message=message)
    )


def _retry_or_fail(claim: Claim, exc: UpstreamError, settings: Settings) -> float | None:
    """Release the claim for a later attempt (returns its delay), or fail the job."""
    if claim.attempt > settings.submit_max_retries:
        _finish(claim, _failure(exc.code, f"gave up after {claim.attempt} attempts: {exc.message}"))
        return None
    # Exponential backoff with full jitter: concurrent retries spread out.
    ceiling = min(settings.submit_retry_cap, settings.submit_retry_base * 2 ** (claim.attempt - 1))
    backoff = random.uniform(0, ceiling)
    retry_after = exc.retry_after if isinstance(exc, TransientUpstreamError) else None
    delay = max(backoff, retry_after or 0.0, 0.1)
    with session_scope() as session:
        job = lock_job(session, claim.job_id)
        if job is None or job.claim_token != claim.token:
            return None  # the claim was lost meanwhile; whoever holds it now decides
        job.claim_token = None
        job.claimed_until = None
        job.create_started_at = None  # the provider said no: nothing was created
        job.retry_at = utcnow() + timedelta(seconds=delay)
        record_event(session, job, Source.SUBMIT, f"{exc.message}; retrying in {delay:.1f}s")
    log.warning(
        "job %s: transient error on submit attempt %d (%s); retrying in %.1fs",
        claim.job_id,
        claim.attempt,
        exc.message,
        delay,
        extra={"job_id": str(claim.job_id), "provider": claim.provider},
    )
    return delay


def _finish(claim: Claim, submission: Submission) -> None:
    adapter = get_provider(claim.provider)
    task_id = submission.state.upstream_task_id
    with session_scope() as session:
        job = lock_job(session, claim.job_id)
        if job is None:
            return
        now = utcnow()
        result = apply_update(session, job, submission.state, now)
        if submission.poll_url:
            job.poll_url = submission.poll_url
        if result.applied and not job.is_terminal:
            job.next_poll_at = first_poll_at(adapter, get_settings(), now)
        # A task this job does not follow (it was cancelled or timed out while
        # the create was in flight, or another attempt's task won): stop it
        # where the provider can, or it runs, and bills, for nothing.
        orphaned = bool(task_id) and task_id != job.upstream_task_id and adapter.can_cancel
    if orphaned:
        cancel_upstream.delay(str(claim.job_id), provider=claim.provider, upstream_task_id=task_id)


@on_terminal
def _finalize_after_commit(job: TerminalJob) -> None:
    try:
        finalize_job.apply_async((str(job.job_id),), {"provider": job.provider}, retry=False)
    except Exception as exc:
        log.warning(
            "job %s: could not send finalize_job (%s); no archive or notification",
            job.job_id,
            exc,
            extra={"job_id": str(job.job_id), "provider": job.provider},
        )


# Own time limits: downloads for the archive may outlast the submit-sized defaults.
@app.task(
    name="variflow.finalize_job",
    bind=True,
    max_retries=None,
    soft_time_limit=900,
    time_limit=960,
)
def finalize_job(self: Any, job_id: str, provider: str = "") -> None:
    """A job ended: archive its results, then tell the application (task and/or notify_url).

    Re-runnable: each step checks what is already done (archived_urls,
    on_complete_sent_at, notified_at); the sweep re-sends it until finalized_at.
    """
    settings = get_settings()
    job_uuid = uuid.UUID(job_id)
    client = get_client()
    # Here rather than in a message of its own: finalize_job is re-sent by the
    # sweep until it finishes, so a lost message cannot leave a paid task running.
    if self.request.retries == 0 and _ended_unwanted(job_uuid):
        stop_upstream_task(job_uuid)
    archive(job_uuid, settings, client)
    _send_on_complete(job_uuid, settings)
    if notify(job_uuid, settings, client):
        _mark(job_uuid, finalized_at=utcnow())
        return
    with session_scope() as session:
        job = session.get(Job, job_uuid)
        ended = job.completed_at if job else None
    if ended is None or (utcnow() - ended).total_seconds() > settings.notify_retry_for:
        with session_scope() as session:
            job = lock_job(session, job_uuid)
            if job is not None:
                job.finalized_at = utcnow()
                record_event(session, job, Source.FINALIZE, "gave up notifying: retry time over")
        return
    _mark(job_uuid, updated_at=utcnow())  # still working on it: the sweep leaves it be
    ceiling = min(300.0, 2.0**self.request.retries)
    raise self.retry(countdown=random.uniform(ceiling / 2, ceiling))


def _mark(job_id: uuid.UUID, **values: Any) -> None:
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )


def _send_on_complete(job_id: uuid.UUID, settings: Settings) -> None:
    """Send the application's own Celery task (named per job or by configuration), once."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.on_complete_sent_at is not None:
            return
        name = job.on_complete_task or settings.on_complete_task
        status, provider = job.status, job.provider
    if not name:
        return
    app.send_task(
        name,
        args=[str(job_id)],
        kwargs={"status": status, "provider": provider},
        queue=settings.on_complete_queue,
    )
    with session_scope() as session:
        job = lock_job(session, job_id)
        if job is not None:
            job.on_complete_sent_at = utcnow()
            record_event(session, job, Source.FINALIZE, f"sent task {name}")


@app.task(name="variflow.poll_due")
def poll_due() -> int:
    """Beat, every VARIFLOW_POLL_INTERVAL: lease due jobs and hand them to poll tasks."""
    settings = get_settings()
    sent = 0
    # Bounded: one run never loops longer than a few leases' worth of work.
    for _ in range(MAX_LEASES_PER_RUN):
        batches = lease_due(settings)
        for batch in batches:
            poll_batch.delay(batch.provider, [str(i) for i in batch.job_ids])
        sent += sum(len(b.job_ids) for b in batches)
        if not batches:
            break
    return sent


@app.task(name="variflow.poll_batch", expires=POLL_LEASE.total_seconds())
def poll_batch(provider: str, job_ids: list[str]) -> None:
    """Poll a leased batch of one provider's jobs; safe to run twice (the lease moved on)."""
    poll_jobs(provider, [uuid.UUID(i) for i in job_ids], get_settings())


@app.task(name="variflow.sweep")
def sweep_jobs() -> dict[str, int]:
    """Beat, every VARIFLOW_SWEEP_INTERVAL: re-send lost jobs, release dead claims,
    fail overdue jobs (and cancel them upstream where the provider can)."""
    report = sweep(get_settings())
    for job_id in report.to_submit:
        send_submit(job_id, report.providers.get(job_id, ""))
    for job_id in report.refinalize:
        finalize_job.delay(str(job_id))
    counts = {k: len(v) for k, v in vars(report).items() if k != "providers"}
    if any(counts.values()):
        log.info("sweep: %s", counts)
    return counts


@app.task(name="variflow.cancel_upstream")
def cancel_upstream(job_id: str, provider: str = "", upstream_task_id: str | None = None) -> None:
    """Best effort: ask the provider to stop a task the job does not follow (an orphan)."""
    stop_upstream_task(uuid.UUID(job_id), upstream_task_id)


def stop_upstream_task(job_id: uuid.UUID, upstream_task_id: str | None = None) -> None:
    """Ask the provider to stop the job's task (or ``upstream_task_id``); record the answer.

    Safe to repeat: cancelling a task that is no longer pending is a "no".
    """
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            return
        task_id = upstream_task_id or job.upstream_task_id
        adapter = get_provider(job.provider)
        if not task_id or not adapter.can_cancel:
            return
        target = PollTarget(job.id, task_id, job.poll_url)
    try:
        cancelled = adapter.cancel(target)
    except UpstreamError as exc:
        cancelled, note = False, exc.message
    else:
        note = (
            "cancelled upstream" if cancelled else "provider could not cancel (no longer pending)"
        )
    with session_scope() as session:
        job = lock_job(session, job_id)
        if job is not None:
            record_event(session, job, Source.CANCEL, f"upstream task {task_id}: {note}")


def _ended_unwanted(job_id: uuid.UUID) -> bool:
    """Cancelled or timed out while a task may still run upstream."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        return (
            job is not None
            and bool(job.upstream_task_id)
            and (job.status == JobStatus.CANCELLED or job.error_code == TIMEOUT)
        )
