"""The submit flow: create a job's task upstream, exactly once per claim.

Tasks may run twice and workers may die at any point, so the flow is a
sequence of committed steps, each written by worker/jobs.py:

1. claim the job (one conditional UPDATE: one submitter at a time, with a TTL);
2. check the deadline and the attempt budget;
3. fetch the input image for a provider that needs the file;
4. commit "a create may be in flight" (``create_started_at``; written by the claim
   itself when there was nothing to download), then call the provider;
5. record the answer — a task to follow, or (synchronous providers) the end state.

A create whose outcome is unknown (sent, but no clear answer) is never sent
again: paying twice is worse than failing clearly (:func:`_outcome_unknown`).
A transient refusal releases the claim for a retry after a backoff, which the
caller (the Celery task) schedules.

The claim is kept alive by a heartbeat while the worker holds it, so its TTL
can be short. A known answer is never dropped: when the database cannot take
it (a restart), the write is retried here for a while, then the answer is
carried in the task's retry message (:attr:`SubmitOutcome.carry`) until it is
written or ``VARIFLOW_SUBMIT_RECORD_RETRY_FOR`` has passed.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.orm import Session

from worker import capacity, job_stats, jobs, metrics
from worker.accounts import DEFAULT_ACCOUNT, Account
from worker.backoff import Backoff
from worker.db import is_unavailable
from worker.errors import (
    ErrorCode,
    InputImageError,
    PermanentUpstreamError,
    TransientUpstreamError,
    UpstreamError,
)
from worker.heartbeat import heartbeat
from worker.images import fetch_image
from worker.jobs import NOT_RESENT, PollPlan, PollReason
from worker.models import Job, utcnow
from worker.providers.base import InputImage, Provider, Submission, SubmitRequest
from worker.results import store_inline
from worker.runtime import Runtime
from worker.states import JobStatus, Source, UpstreamState
from worker.webhook_secrets import hash_secret

log = logging.getLogger(__name__)


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
    row: Job  # the job as the claim wrote it (lets the answer be written without a read)
    account: Account  # the account capacity admitted it on (its key creates the task)
    limited: bool = False  # the provider has capacity limits: outcomes feed its breaker


@dataclass(frozen=True)
class SubmitOutcome:
    """What the caller must do next: retry after ``retry_in`` seconds (carrying the
    provider's answer ``carry`` when it is set), and/or cancel ``orphan`` (a task
    created upstream that the job does not follow), and/or poll the job after
    ``poll_in`` seconds (:func:`first_poll_in`)."""

    retry_in: float | None = None
    orphan: str | None = None
    carry: dict[str, Any] | None = None
    poll_in: float | None = None  # send the job's first poll in this many seconds


NOTHING_TO_DO = SubmitOutcome()
# Writing a known answer: tried again every few seconds, in this worker, for this long.
RECORD_IN_WORKER_FOR = 60.0
RECORD_BACKOFF = Backoff(start=0.5, cap=5.0, floor=0.2)
# Another worker holds the claim: look again when it may have lapsed, this many times.
MAX_HELD_RETRIES = 20
# A 429 without Retry-After pauses its account this long.
PAUSE_DEFAULT = 30.0
T = TypeVar("T")


def claim_for_submit(
    job_id: uuid.UUID,
    runtime: Runtime,
    *,
    mark_create: bool = False,
    account: Account | None = None,
    session: Session | None = None,
) -> Claim | None:
    """Make this worker the job's only submitter, or return None.

    ``mark_create``: the create call follows the claim at once (nothing to
    download first), so the claim marks it started in the same write.
    ``account``: the one capacity admitted the job on (default: the provider's
    first), in ``session`` when admission holds one.
    """
    create_follows = (
        tuple(a.name for a in runtime.providers if not a.needs_image_bytes) if mark_create else ()
    )
    token = secrets.token_hex(16)
    # A fresh secret per attempt: webhooks from an abandoned earlier create
    # cannot authenticate as this job's task.
    webhook_secret = secrets.token_urlsafe(32)

    def claim(session: Session) -> Claim | None:
        claimed = jobs.claim_for_submit(
            session,
            job_id,
            token=token,
            secret_hash=hash_secret(webhook_secret),
            ttl=runtime.settings.submit_claim_ttl,
            now=utcnow(),
            create_follows=create_follows,
            account=account.name if account is not None else DEFAULT_ACCOUNT,
        )
        if claimed is None:
            return None
        job, stored = claimed
        image = InputImage(stored.content, stored.filename, stored.content_type) if stored else None
        accounts = runtime.providers.accounts(job.provider)
        return Claim(
            job_id=job.id,
            provider=job.provider,
            token=token,
            attempt=job.submit_attempts,
            params=dict(job.params),
            deadline=job.deadline,
            webhook_secret=webhook_secret,
            image=image,
            row=job,
            account=account or accounts[0],
            limited=capacity.limited(accounts),
        )

    if session is not None:
        return claim(session)
    with runtime.autocommit() as own:
        return claim(own)


def submit(
    job_id: uuid.UUID,
    runtime: Runtime,
    *,
    carried: dict[str, Any] | None = None,
    held_retries: int = 0,
    provider: str = "",
    wake: Callable[[list[uuid.UUID]], object] = lambda ids: None,
) -> SubmitOutcome:
    """Run one submit attempt for a job (nothing when it is not queued or not yet due).

    ``carried``: a provider's answer an earlier run could not write; it is
    written now, and nothing is sent to the provider. For a provider with
    capacity limits, the job is admitted first (worker/capacity.py) or waits;
    once admitted, ``wake`` is given the next waiting jobs (the caller sends them).
    """
    if carried is not None:
        return _record_carried(job_id, carried, runtime)
    provider = provider or _provider_of(job_id, runtime)
    accounts = runtime.providers.accounts(provider) if provider else ()
    if accounts and capacity.limited(accounts):
        admitted = _admit(job_id, accounts, runtime, wake, held_retries)
        if isinstance(admitted, SubmitOutcome):
            return admitted
        claim: Claim | None = admitted
    else:
        claim = claim_for_submit(job_id, runtime, mark_create=True)
    if claim is None:
        return _not_claimed(job_id, runtime, held_retries)
    settings = runtime.settings
    renew = _claim_renewal(claim, runtime)
    with heartbeat(renew, settings.submit_claim_ttl / 3, f"submit claim of job {job_id}"):
        return _attempt(claim, runtime)


def wake_for_room(provider: str, runtime: Runtime) -> list[uuid.UUID]:
    """Wake the waiting jobs of the provider's queue its accounts have room for now
    (capacity.to_wake), first in line first; the caller sends their submits."""
    settings = runtime.settings
    with runtime.autocommit() as session:
        return capacity.to_wake(
            session,
            runtime.providers.accounts(provider),
            utcnow(),
            breaker_threshold=settings.breaker_threshold,
            breaker_cooldown=settings.breaker_cooldown,
        )


def _provider_of(job_id: uuid.UUID, runtime: Runtime) -> str:
    # A message without its provider (old ones): one read to know whether capacity applies.
    with runtime.autocommit() as session:
        return session.scalar(select(Job.provider).where(Job.id == job_id)) or ""


def _admit(
    job_id: uuid.UUID,
    accounts: tuple[Account, ...],
    runtime: Runtime,
    wake: Callable[[list[uuid.UUID]], object],
    held_retries: int,
) -> Claim | SubmitOutcome | None:
    """Admission and claim in one transaction, under the provider's admission lock:
    the job is claimed on an account with capacity, fails (a budget, policy "fail"),
    or waits with its reason (only the head of the queue sets a timer)."""
    settings = runtime.settings
    provider = accounts[0].provider
    # The row, and the job's place in line, are read before the lock: a job nobody may
    # claim now (a second wake of a job already on its way, a job another worker holds)
    # costs this one read, and a job deep in a long line is marked waiting here; neither
    # queues for the lock that the jobs refilling free slots need. What admission reads
    # from the row does not change while it waits (provider, priority, place in line,
    # deadline), and whether the job is still free to claim is decided by the claim's
    # own conditional write. The place in line may change meanwhile: earlier jobs
    # admitted (the job then waits one wake longer), or, rarely, a more urgent job
    # created or a claim lapsing ahead of it in that instant (it may then go first).
    # Slots are counted under the lock: nothing is ever admitted beyond them.
    with runtime.autocommit() as session:
        job = session.get(Job, job_id)
        now = utcnow()
        if job is None or not jobs.claimable(job, now):
            return _not_claimed(job_id, runtime, held_retries, job)
        ahead = capacity.jobs_ahead(session, job, now, capacity.line_cap(accounts))
    # Under the "fail" budget policy a job must be asked, not assumed to wait: a budget
    # spent fails it at once.
    failing = settings.budget_policy == "fail"
    certain = None if failing else capacity.surely_waits(accounts, ahead)
    if certain is not None:
        with runtime.session() as session:
            _wait(session, job, certain, now)
        return NOTHING_TO_DO
    waited = job.waiting_reason is not None
    claim: Claim | None = None
    outcome: SubmitOutcome | None = None
    with runtime.session() as session:
        # The time is taken under the lock, so that a rate turn is never dated before
        # the wait for it.
        capacity.lock_provider(session, provider)
        now = utcnow()
        decision = capacity.admit(
            session,
            accounts,
            job,
            now,
            budget_policy=settings.budget_policy,
            breaker_threshold=settings.breaker_threshold,
            breaker_cooldown=settings.breaker_cooldown,
            ahead=ahead,
        )
        if decision.fail:
            assert decision.reason is not None
            # Refused on the row as it is now (read again under the lock): another
            # worker may have claimed the job, and be creating it, since the first read.
            current = session.get(Job, job_id, populate_existing=True)
            if current is None or not jobs.claimable(current, now):
                return None
            jobs.refuse(session, current, ErrorCode.BUDGET_EXHAUSTED, decision.reason, now)
            outcome = NOTHING_TO_DO
            to_wake = 1  # the next in line is refused too (or admitted), not left waiting
        elif decision.account is None:
            assert decision.reason is not None
            _wait(session, job, decision.reason, now)
            timer = None
            if decision.until is not None and decision.ahead == 0:
                timer = max(0.05, (decision.until - now).total_seconds())
            outcome = SubmitOutcome(retry_in=timer)
            # Room, but earlier jobs first: make sure the first of them is on its way.
            to_wake = 2 if decision.room else 0
        else:
            claim = claim_for_submit(
                job_id, runtime, mark_create=True, account=decision.account, session=session
            )
            if claim is None:
                # Claimed by another worker since the read: the rate turns taken for
                # this job are given back with the transaction.
                session.rollback()
                return None
            # As many more as there is room for now; and on an account whose creates
            # are spaced by a rate, the next in line, to wait for its turn on a timer
            # (a slot is refilled by the end of the job holding it, not from here).
            to_wake = decision.spare + (1 if capacity.paced(decision.account) else 0)
    # Committed, and the lock released: the next in line may be admitted now, by another
    # worker (never this job itself: it is claimed, or it would only wake itself again).
    if to_wake:
        # Never fatal: the job's own outcome is committed (a claim with its create about
        # to be sent must not be lost to an error here); the sweep wakes the line.
        try:
            with runtime.autocommit() as session:
                head = capacity.wake_next(session, provider, to_wake, utcnow(), but=job_id)
            if head:
                wake(head)
        except Exception as exc:
            log.warning("could not wake %s's queue (%s); the sweep will", provider, exc)
    if claim is not None and waited:
        metrics.observe_capacity_wait(provider, (now - job.created_at).total_seconds())
    return outcome if outcome is not None else claim


def _wait(session: Session, job: Job, reason: str, now: datetime) -> None:
    """The job waits for capacity, for ``reason``. One event per kind of wait: "3/3 in
    flight" and "earlier jobs go first" alternate near the head of a queue, and are both
    a wait for a slot."""
    kind = job_stats.wait_reason_kind(reason)
    announce = job.waiting_reason is None or job_stats.wait_reason_kind(job.waiting_reason) != kind
    jobs.set_waiting(session, job.id, reason, now, announce=announce)
    log.info("job %s waits: %s", job.id, reason)


def _not_claimed(
    job_id: uuid.UUID, runtime: Runtime, held_retries: int, row: Job | None = None
) -> SubmitOutcome:
    """Not queued, not due, or claimed by another worker — which may have died: then
    look again when its claim can have lapsed (a message redelivered after a worker
    was killed must not wait for the sweep). ``row``: the job as just read, if it was."""
    if row is not None:
        expiry = jobs.claim_lapses_at(row)
    else:
        with runtime.session() as session:
            expiry = jobs.claim_expiry(session, job_id)
    if expiry is None or held_retries >= MAX_HELD_RETRIES:
        log.info("job %s: nothing to submit (not queued, claimed, or not yet due)", job_id)
        return NOTHING_TO_DO
    wait = max(1.0, (expiry - utcnow()).total_seconds() + 1.0)
    log.info("job %s: claimed by another worker; looking again in %.0fs", job_id, wait)
    return SubmitOutcome(retry_in=wait)


def _claim_renewal(claim: Claim, runtime: Runtime) -> Callable[[], object]:
    def renew() -> bool:
        with runtime.autocommit() as session:
            return jobs.renew_claim(
                session, claim.job_id, claim.token, runtime.settings.submit_claim_ttl, utcnow()
            )

    return renew


def _attempt(claim: Claim, runtime: Runtime) -> SubmitOutcome:
    settings = runtime.settings
    job_id = claim.job_id
    if claim.deadline <= utcnow():
        return _finish(
            claim,
            _failure(ErrorCode.TIMEOUT, "deadline passed before the job was submitted"),
            runtime,
        )
    if claim.attempt > settings.submit_max_retries + 1:
        return _finish(
            claim,
            _failure(ErrorCode.SUBMIT_FAILED, f"gave up after {claim.attempt - 1} attempts"),
            runtime,
        )
    adapter = runtime.providers.for_account(claim.provider, claim.account.name)
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
    if adapter.needs_image_bytes and request.image is None:
        try:
            request = replace(request, image=_fetch_input(adapter, claim, runtime))
        except PermanentUpstreamError as exc:
            return _finish(claim, _failure(exc.code, exc.message), runtime)
        except UpstreamError as exc:
            return _retry_or_fail(claim, exc, runtime)
    # Committed before the call (by the claim itself when nothing was to be
    # downloaded): a claim that lapses with this set may have created a paid task
    # (the sweep then never sends it again). A database error here happens
    # before anything was sent: the task tries again.
    if claim.row.create_started_at is None:
        with runtime.autocommit() as session:
            if not jobs.mark_create_started(session, claim.job_id, claim.token, utcnow()):
                return NOTHING_TO_DO  # the claim was lost meanwhile
    try:
        submission = adapter.submit(request)
    except PermanentUpstreamError as exc:
        _account_outcome(claim, runtime, transient=False)
        return _finish(claim, _failure(exc.code, exc.message), runtime)
    except TransientUpstreamError as exc:
        _account_outcome(claim, runtime, transient=True, refused=exc)
        if exc.maybe_processed:
            return _outcome_unknown(claim, adapter, exc.message, runtime)
        return _retry_or_fail(claim, exc, runtime)
    except UpstreamError as exc:
        return _retry_or_fail(claim, exc, runtime)
    except (Exception, SoftTimeLimitExceeded) as exc:
        # Raised around the create call: it may or may not have happened.
        log.exception("job %s: unexpected error while submitting", job_id)
        return _outcome_unknown(claim, adapter, f"internal error: {exc!r}", runtime)
    _account_outcome(claim, runtime, transient=False)
    return _finish(claim, _store_inline_results(claim, submission, runtime), runtime)


def _account_outcome(
    claim: Claim,
    runtime: Runtime,
    *,
    transient: bool,
    refused: TransientUpstreamError | None = None,
) -> None:
    """Tell the account's breaker how its create went; a 429 pauses the whole account
    until Retry-After. Only for providers with capacity limits; never fatal."""
    if not claim.limited:
        return
    settings = runtime.settings
    now = utcnow()
    try:
        if not transient:  # nearly every create: one statement, which writes nothing
            with runtime.autocommit() as session:
                capacity.record_success(session, claim.account, now)
            return
        with runtime.session() as session:
            capacity.record_outcome(
                session,
                claim.account,
                claim.job_id,
                transient_failure=transient,
                now=now,
                threshold=settings.breaker_threshold,
                cooldown=settings.breaker_cooldown,
            )
            if refused is not None and refused.code == ErrorCode.RATE_LIMITED:
                wait = refused.retry_after if refused.retry_after is not None else PAUSE_DEFAULT
                until = now + timedelta(seconds=wait)
                capacity.pause(session, claim.account, until, refused.message, now)
    except Exception:  # the job's own outcome matters more than the account's health
        log.exception(
            "job %s: could not record the outcome for %s", claim.job_id, claim.account.label
        )


def _store_inline_results(claim: Claim, submission: Submission, runtime: Runtime) -> Submission:
    """Keep images a provider returned inline; a failure here must not re-POST a paid create."""
    try:
        return replace(
            submission,
            state=store_inline(runtime.results, runtime.settings, claim.job_id, submission.state),
        )
    except OSError as exc:
        log.exception("job %s: could not store inline results", claim.job_id)
        return _failure(
            ErrorCode.RESULT_STORAGE_FAILED, f"could not store the result images: {exc}"
        )


def _outcome_unknown(
    claim: Claim, adapter: Provider, reason: str, runtime: Runtime
) -> SubmitOutcome:
    """The create may have happened upstream. Never send it again.

    A webhook provider calls back to this job's URL with this claim's secret
    if the task exists, and the receiver adopts it; so the claim (and secret)
    is kept for the webhook grace period, after which the sweep fails the job.
    Other providers offer no way to find the task: the job fails now.
    """
    if adapter.webhook_grace is None:
        return _finish(
            claim, _failure(ErrorCode.SUBMIT_OUTCOME_UNKNOWN, f"{reason}; {NOT_RESENT}"), runtime
        )
    wait = adapter.webhook_grace

    def hold() -> None:
        with runtime.session() as session:
            jobs.hold_for_webhook(
                session,
                claim.job_id,
                claim.token,
                wait,
                f"{reason}; the task may exist upstream: waiting {wait:g}s for its webhook",
                utcnow(),
            )

    _write(hold, RECORD_IN_WORKER_FOR)
    return NOTHING_TO_DO


def _fetch_input(adapter: Provider, claim: Claim, runtime: Runtime) -> InputImage:
    """Download the job's image URL for a provider that needs the file, and check it."""
    image = fetch_image(claim.params["image_url"], runtime.settings, runtime.http)
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


def retry_backoff(runtime: Runtime) -> Backoff:
    settings = runtime.settings
    return Backoff(start=settings.submit_retry_base, cap=settings.submit_retry_cap, floor=0.1)


def _retry_or_fail(claim: Claim, exc: UpstreamError, runtime: Runtime) -> SubmitOutcome:
    """Release the claim for a later attempt (the outcome says when), or fail the job."""
    if claim.attempt > runtime.settings.submit_max_retries:
        return _finish(
            claim,
            _failure(exc.code, f"gave up after {claim.attempt} attempts: {exc.message}"),
            runtime,
        )
    retry_after = exc.retry_after if isinstance(exc, TransientUpstreamError) else None
    delay = retry_backoff(runtime).delay(claim.attempt - 1, retry_after)

    def release() -> bool:
        with runtime.session() as session:
            return jobs.release_for_retry(
                session,
                claim.job_id,
                claim.token,
                delay,
                f"{exc.message}; retrying in {delay:.1f}s",
                utcnow(),
            )

    if not _write(release, RECORD_IN_WORKER_FOR):
        return NOTHING_TO_DO  # the claim was lost meanwhile; whoever holds it now decides
    log.warning(
        "job %s: transient error on submit attempt %d (%s); retrying in %.1fs",
        claim.job_id,
        claim.attempt,
        exc.message,
        delay,
        extra={"job_id": str(claim.job_id), "provider": claim.provider},
    )
    return SubmitOutcome(retry_in=delay)


def _finish(claim: Claim, submission: Submission, runtime: Runtime) -> SubmitOutcome:
    """Write how the submission ended — an answer the provider gave must reach the row."""
    answered_at = utcnow()
    try:
        return _write(
            lambda: _record(claim.job_id, claim.provider, submission, runtime, claim.row),
            RECORD_IN_WORKER_FOR,
        )
    except SoftTimeLimitExceeded:
        # Out of time while writing: the answer leaves with the retry message.
        log.error("job %s: out of time writing the provider's answer; carrying it", claim.job_id)
        return _carry(claim.provider, submission, answered_at)
    except Exception as exc:
        if is_unavailable(exc):
            log.error(
                "job %s: the database did not take the provider's answer for %.0fs (%s); "
                "carrying it in the retry message",
                claim.job_id,
                RECORD_IN_WORKER_FOR,
                type(exc).__name__,
                extra={"job_id": str(claim.job_id), "provider": claim.provider},
            )
            return _carry(claim.provider, submission, answered_at)
        # The database refused the answer itself (a value it cannot store): the
        # job ends failed with a message naming the task, rather than staying
        # queued until the sweep calls its outcome unknown.
        log.exception("job %s: the provider's answer could not be stored", claim.job_id)
        task = submission.state.upstream_task_id
        refused = _failure(
            ErrorCode.UPSTREAM_ERROR,
            f"the provider's answer could not be stored ({type(exc).__name__})"
            + (f"; its task id begins {task[:64]!r}" if task else ""),
        )
        return _write(
            lambda: _record(claim.job_id, claim.provider, refused, runtime),
            RECORD_IN_WORKER_FOR,
        )


def _record(
    job_id: uuid.UUID,
    provider: str,
    submission: Submission,
    runtime: Runtime,
    claimed: Job | None = None,
) -> SubmitOutcome:
    task_id = submission.state.upstream_task_id
    adapter = runtime.providers.get(provider)
    plan = PollPlan.of(runtime.settings, adapter.webhook_grace)
    state, poll_url = submission.state, submission.poll_url
    # One statement, when nothing can have got there first. Not for a webhook
    # provider: its webhook often does, and then reading the row is cheaper
    # than a conditional write that finds it changed.
    if claimed is not None and not adapter.supports_webhook:
        with runtime.autocommit() as session:
            if jobs.record_untouched_submission(session, claimed, state, plan, poll_url=poll_url):
                # The job follows the task it was given (and is polled first by a message
                # sent with it, for a polled provider with slot limits).
                if state.status is not JobStatus.SUBMITTED:
                    return NOTHING_TO_DO
                accounts = runtime.providers.accounts(provider)
                return SubmitOutcome(poll_in=first_poll_in(adapter, accounts, plan))
    try:  # no lock held: the row is read and the write guarded by what was read
        with runtime.autocommit() as session:
            job = jobs.record_submission(
                session, job_id, state, plan, poll_url=poll_url, guarded=True
            )
    except jobs.RowBusy:  # it kept changing (rare): decide under the row's lock
        with runtime.session() as session:
            job = jobs.record_submission(session, job_id, state, plan, poll_url=poll_url)
    if job is None:
        return NOTHING_TO_DO
    # A task this job does not follow (it was cancelled or timed out while
    # the create was in flight, or another attempt's task won): stop it
    # where the provider can, or it runs, and bills, for nothing.
    orphaned = bool(task_id) and task_id != job.upstream_task_id and adapter.can_cancel
    return SubmitOutcome(orphan=task_id if orphaned else None)


def first_poll_in(adapter: Provider, accounts: Sequence[Account], plan: PollPlan) -> float | None:
    """Seconds until a just-submitted job's first poll, when it is sent with the job
    (None: beat's next tick leases it). Only for a polled provider with slot limits: its
    slot frees only when a poll sees the job end, and a poll leased by beat comes up to
    a whole VARIFLOW_POLL_INTERVAL after the job is due."""
    if adapter.supports_webhook or not capacity.slot_limited(accounts):
        return None
    now = utcnow()
    return (plan.next_at(PollReason.SUBMITTED, now) - now).total_seconds()


def _write(write: Callable[[], T], for_seconds: float) -> T:
    """Run a database write, trying again while the database is unavailable."""
    give_up = time.monotonic() + for_seconds
    attempt = 0
    while True:
        try:
            return write()
        except Exception as exc:
            if not is_unavailable(exc) or time.monotonic() >= give_up:
                raise
            delay = RECORD_BACKOFF.delay(attempt)
            log.warning(
                "database unavailable (%s); trying again in %.1fs", type(exc).__name__, delay
            )
            time.sleep(min(delay, max(0.0, give_up - time.monotonic())))
            attempt += 1


# --- an answer carried in a retry message ------------------------------------------------


def _carry(provider: str, submission: Submission, answered_at: datetime) -> SubmitOutcome:
    state = submission.state
    carried = {
        "provider": provider,
        "answered_at": answered_at.isoformat(),
        "poll_url": submission.poll_url,
        "state": {
            "status": state.status.value,
            "source": state.source.value,
            "progress": state.progress,
            "image_urls": list(state.image_urls),
            "error_code": state.error_code,
            "error_message": state.error_message,
            "upstream_task_id": state.upstream_task_id,
            "payload": dict(state.payload) if state.payload else None,
        },
    }
    return SubmitOutcome(retry_in=RECORD_BACKOFF.cap, carry=carried)


def _record_carried(job_id: uuid.UUID, carried: dict[str, Any], runtime: Runtime) -> SubmitOutcome:
    data = carried["state"]
    state = UpstreamState(
        status=JobStatus(data["status"]),
        source=Source(data["source"]),
        progress=data["progress"],
        image_urls=tuple(data["image_urls"]),
        error_code=data["error_code"],
        error_message=data["error_message"],
        upstream_task_id=data["upstream_task_id"],
        payload=data["payload"],
    )
    submission = Submission(state=state, poll_url=carried["poll_url"])
    answered_at = datetime.fromisoformat(carried["answered_at"])
    window = timedelta(seconds=runtime.settings.submit_record_retry_for)
    try:
        return _write(
            lambda: _record(job_id, carried["provider"], submission, runtime),
            RECORD_BACKOFF.cap * 2,
        )
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        if utcnow() - answered_at > window:
            log.error(
                "job %s: gave up writing the provider's answer after %s (task %s); "
                "the sweep fails the job",
                job_id,
                window,
                state.upstream_task_id,
            )
            return NOTHING_TO_DO
        return SubmitOutcome(retry_in=RECORD_BACKOFF.cap, carry=carried)
