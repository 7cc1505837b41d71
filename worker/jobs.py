"""Writing jobs: the only code that changes job rows, one function per thing that happened.

Every change of status goes through :func:`apply_update`, which asks
:func:`worker.states.transition` what to do, writes it and records the event.
The other columns have their owner here too: the submit claim
(:func:`claim_for_submit`, :func:`release_for_retry`, ...), the next poll time
(:class:`PollPlan`, decided next to the transition), and the after-the-end
bookkeeping of finalize. Flows decide *when*; this module decides *what is
written*. Every function works inside the caller's transaction (a session)
and never commits.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.backoff import Backoff
from worker.config import Settings
from worker.db import is_postgres
from worker.errors import ErrorCode, VariflowError
from worker.hooks import note_terminal
from worker.models import Job, JobEvent, JobInput, utcnow
from worker.states import (
    ACTIVE_UPSTREAM_STATUSES,
    TERMINAL_STATUSES,
    EventKind,
    JobStatus,
    Source,
    Transition,
    UpstreamState,
    transition,
)
from worker.status import TerminalJob

log = logging.getLogger(__name__)

ACTIVE = [s.value for s in ACTIVE_UPSTREAM_STATUSES]
NOT_TERMINAL = [s.value for s in JobStatus if not s.is_terminal]
# A message that arrives a moment before its retry is due still counts.
RETRY_TOLERANCE = timedelta(seconds=1)
NOT_RESENT = "the provider may have created the task, so it was not sent again (no double charge)"
# The claim token of a lapsed claim whose create was sent, while the sweep waits for
# its answer (its holder may still be alive and take it back, see renew_claim).
LAPSED = "lapsed"


# --- reading ------------------------------------------------------------------------------


def lock_job(session: Session, job_id: uuid.UUID) -> Job | None:
    """Load a job holding its row lock (PostgreSQL) until the transaction ends."""
    return session.scalars(
        select(Job)
        .where(Job.id == job_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()


def lock_by_task(session: Session, provider: str, upstream_task_id: str) -> Job | None:
    """The job following a provider's task, locked."""
    return session.scalars(
        select(Job)
        .where(Job.provider == provider, Job.upstream_task_id == upstream_task_id)
        .with_for_update()
    ).one_or_none()


# --- the next poll -----------------------------------------------------------------------


class PollReason(Enum):
    SUBMITTED = "the provider accepted the job"
    WEBHOOK = "a webhook arrived"
    POLLED = "a poll answered"
    POLL_FAILED = "a poll did not answer"
    SWEEP = "no poll was scheduled"


@dataclass(frozen=True)
class PollPlan:
    """When a provider's in-flight job is polled next: the one place that decides it.

    A webhook provider's job is polled only when no webhook came for
    ``webhook_grace`` seconds (after its submission and after each webhook);
    otherwise polls back off while nothing changes (``backoff``, attempts
    counted in ``poll_attempts``), and a provider's Retry-After wins.
    """

    backoff: Backoff
    webhook_grace: float | None = None

    @classmethod
    def of(cls, settings: Settings, webhook_grace: float | None) -> PollPlan:
        return cls(
            # Polls keep close to their nominal schedule: 10 % jitter, no floor.
            Backoff(
                start=settings.poll_backoff_start,
                factor=settings.poll_backoff_factor,
                cap=settings.poll_backoff_cap,
                jitter=0.1,
            ),
            webhook_grace,
        )

    def next_at(
        self, reason: PollReason, now: datetime, attempts: int = 0, retry_after: float | None = None
    ) -> datetime:
        if reason is PollReason.SWEEP:
            wait = 0.0
        elif (
            reason in (PollReason.SUBMITTED, PollReason.WEBHOOK) and self.webhook_grace is not None
        ):
            wait = self.webhook_grace
        elif reason is PollReason.SUBMITTED:
            wait = self.backoff.start
        else:
            wait = self.backoff.delay(attempts, retry_after)
        return now + timedelta(seconds=wait)


# --- every status change -----------------------------------------------------------------


def apply_update(
    session: Session,
    job: Job,
    update: UpstreamState,
    now: datetime | None = None,
    *,
    record_duplicates: bool = True,
) -> Transition:
    """Apply ``update`` to a job the caller has locked; the caller commits."""
    now = now or utcnow()
    result = transition(job, update, now)
    for column, value in result.changes.items():
        setattr(job, column, value)
    if result.became_terminal:
        assert job.completed_at is not None
        note_terminal(
            session,
            TerminalJob(
                job.id, job.provider, job.status, job.created_at, job.submitted_at, job.completed_at
            ),
        )
    if result.event is not None and (record_duplicates or not result.event.duplicate):
        event = result.event
        _add_event(
            session,
            job.id,
            now,
            event.source,
            event.kind,
            event.from_status,
            event.to_status,
            event.message,
            dict(event.payload) if event.payload else None,
        )
        log.info(
            "job %s %s %s: %s -> %s%s",
            job.id,
            event.source,
            event.kind,
            event.from_status,
            event.to_status,
            f" ({event.message})" if event.message else "",
            extra={"job_id": str(job.id), "provider": job.provider},
        )
    return result


def record_event(
    session: Session,
    job: Job,
    source: Source,
    message: str,
    *,
    kind: EventKind = EventKind.INFO,
    payload: dict[str, object] | None = None,
) -> None:
    """Record something that happened to a job without changing its status."""
    status = JobStatus(job.status)
    _add_event(session, job.id, utcnow(), source, kind, status, status, message, payload)


def _add_event(
    session: Session,
    job_id: uuid.UUID,
    at: datetime,
    source: Source,
    kind: EventKind,
    from_status: JobStatus | None,
    to_status: JobStatus,
    message: str | None,
    payload: dict[str, Any] | None = None,
) -> JobEvent:
    added = JobEvent(
        job_id=job_id,
        at=at,
        source=source.value,
        kind=kind.value,
        from_status=from_status.value if from_status else None,
        to_status=to_status.value,
        message=message,
        payload=payload,
    )
    session.add(added)
    return added


def note(session: Session, job_id: uuid.UUID, source: Source, message: str) -> None:
    """Record an event on a job by id (nothing if it is gone)."""
    job = lock_job(session, job_id)
    if job is not None:
        record_event(session, job, source, message)


# --- a new job ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NewInput:
    content: bytes
    filename: str
    content_type: str


def create_job(
    session: Session,
    *,
    provider: str,
    params: dict[str, Any],
    deadline: datetime,
    idempotency_key: str | None = None,
    notify_url: str | None = None,
    on_complete_task: str | None = None,
    image: NewInput | None = None,
    now: datetime | None = None,
) -> tuple[Job, JobEvent]:
    """A queued job, its input image and its first event (the caller commits).

    Returns the job and that event as written, so the caller needs no read-back.
    """
    now = now or utcnow()
    job = Job(
        id=uuid.uuid4(),
        provider=provider,
        status=JobStatus.QUEUED.value,
        params=params,
        idempotency_key=idempotency_key,
        deadline=deadline,
        notify_url=notify_url,
        on_complete_task=on_complete_task,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    if image is not None:
        session.add(
            JobInput(
                job_id=job.id,
                content=image.content,
                filename=image.filename,
                content_type=image.content_type,
            )
        )
    accepted = _add_event(
        session, job.id, now, Source.API, EventKind.TRANSITION, None, JobStatus.QUEUED, "accepted"
    )
    return job, accepted


def cancel(session: Session, job: Job, reason: str) -> Transition:
    """The application cancelled the job (a terminal job is left as it is)."""
    return _end(session, job, JobStatus.CANCELLED, Source.CANCEL, ErrorCode.CANCELLED, reason)


def _end(
    session: Session,
    job: Job,
    status: JobStatus,
    source: Source,
    code: ErrorCode,
    message: str,
    now: datetime | None = None,
) -> Transition:
    """End a job as failed or cancelled by variflow itself (through the transition)."""
    update = UpstreamState(status, source, error_code=code, error_message=message)
    return apply_update(session, job, update, now)


# --- submitting --------------------------------------------------------------------------


def claim_for_submit(
    session: Session,
    job_id: uuid.UUID,
    *,
    token: str,
    secret_hash: str,
    ttl: float,
    now: datetime,
) -> tuple[Job, JobInput | None] | None:
    """Make the caller the job's only submitter, or None (not queued, claimed, or not due).

    One conditional UPDATE decides between concurrent workers (the database
    serialises it); the claim expires after ``ttl`` so a worker that dies
    holding it does not strand the job.
    """
    claimed = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == JobStatus.QUEUED.value,
            or_(Job.claimed_until.is_(None), Job.claimed_until < now),
            or_(Job.retry_at.is_(None), Job.retry_at <= now + RETRY_TOLERANCE),
            # A create may have been sent: never again (the sweep settles it).
            Job.create_started_at.is_(None),
        )
        .values(
            claim_token=token,
            claimed_until=now + timedelta(seconds=ttl),
            submit_attempts=Job.submit_attempts + 1,
            webhook_secret_hash=secret_hash,
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
    return job, session.get(JobInput, job_id)


def renew_claim(session: Session, job_id: uuid.UUID, token: str, ttl: float, now: datetime) -> bool:
    """The claim's holder is alive: push its expiry ``ttl`` ahead (never shorten it).

    A claim the sweep marked lapsed (the holder could not renew while the
    database was away) is the holder's again: it is alive after all.
    """
    until = now + timedelta(seconds=ttl)
    renewed = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.claim_token.in_((token, LAPSED)),
            Job.status == JobStatus.QUEUED.value,
            or_(Job.claim_token == token, Job.create_started_at.is_not(None)),
            or_(Job.claimed_until < until, Job.claim_token == LAPSED),
        )
        .values(claimed_until=until, claim_token=token)
        .execution_options(synchronize_session=False)
    )
    return bool(renewed.rowcount)  # type: ignore[attr-defined]


def _holds(job: Job, token: str) -> bool:
    """The claim is ``token``'s, or was, and the sweep has only marked it lapsed."""
    return job.claim_token == token or (
        job.claim_token == LAPSED and job.create_started_at is not None
    )


def claim_expiry(session: Session, job_id: uuid.UUID) -> datetime | None:
    """When another worker's claim on a queued job lapses, if the job can then be claimed
    (None: not queued, not claimed, or a create was sent under the claim)."""
    return session.scalar(
        select(Job.claimed_until).where(
            Job.id == job_id,
            Job.status == JobStatus.QUEUED.value,
            Job.claim_token.is_not(None),
            Job.create_started_at.is_(None),
        )
    )


def mark_create_started(session: Session, job_id: uuid.UUID, token: str, now: datetime) -> bool:
    """Note, before the create call, that one may be in flight (the sweep reads it)."""
    marked = session.execute(
        update(Job)
        # Once per claim, and never twice for a job: a create sent is never sent again.
        .where(Job.id == job_id, Job.claim_token == token, Job.create_started_at.is_(None))
        .values(create_started_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(marked.rowcount)  # type: ignore[attr-defined]


def release_for_retry(
    session: Session, job_id: uuid.UUID, token: str, delay: float, message: str, now: datetime
) -> bool:
    """The provider said "not now": free the claim and let the job be claimed after ``delay``.

    False when the claim was lost meanwhile (whoever holds it now decides).
    """
    job = lock_job(session, job_id)
    if job is None or not _holds(job, token):
        return False
    job.claim_token = None
    job.claimed_until = None
    job.create_started_at = None  # the provider said no: nothing was created
    job.retry_at = now + timedelta(seconds=delay)
    record_event(session, job, Source.SUBMIT, message)
    return True


def hold_for_webhook(
    session: Session, job_id: uuid.UUID, token: str, wait: float, message: str, now: datetime
) -> bool:
    """A create's outcome is unknown: keep the claim (and its webhook secret) for ``wait``
    seconds so the task's own webhook can still be adopted; the sweep fails it after."""
    job = lock_job(session, job_id)
    if job is None or not _holds(job, token):
        return False
    job.claim_token = token
    job.claimed_until = now + timedelta(seconds=wait)
    record_event(session, job, Source.SUBMIT, message)
    return True


def record_submission(
    session: Session,
    job_id: uuid.UUID,
    state: UpstreamState,
    plan: PollPlan,
    *,
    poll_url: str | None = None,
    now: datetime | None = None,
) -> Job | None:
    """What the create call answered (or how the submission ended), written to the row."""
    now = now or utcnow()
    job = lock_job(session, job_id)
    if job is None:
        return None
    result = apply_update(session, job, state, now)
    if poll_url:
        job.poll_url = poll_url
    if result.applied and not job.is_terminal:
        job.next_poll_at = plan.next_at(PollReason.SUBMITTED, now)
    return job


# --- webhooks ----------------------------------------------------------------------------


def accept_webhook(
    session: Session, job: Job, state: UpstreamState, plan: PollPlan, now: datetime | None = None
) -> Transition:
    """A verified webhook for a locked job: apply it, and poll only if the next one is late.

    :class:`TaskIdTaken` (and nothing written) when it would give the job a task id
    another job of its provider follows: a task belongs to one job (the unique
    constraint on provider and upstream task id), whichever adopted it first.
    """
    now = now or utcnow()
    task_id = state.upstream_task_id
    if not task_id or job.upstream_task_id or job.is_terminal:
        return _accept_webhook(session, job, state, plan, now)  # no task id to adopt
    if task_owner(session, job.provider, task_id) not in (None, job.id):
        raise TaskIdTaken(task_id)
    try:
        # A job adopting the same task id concurrently is seen only by the constraint.
        with session.begin_nested():
            result = _accept_webhook(session, job, state, plan, now)
            session.flush()
    except IntegrityError as exc:
        if task_owner(session, job.provider, task_id) in (None, job.id):
            raise
        raise TaskIdTaken(task_id) from exc
    return result


# --- polling -----------------------------------------------------------------------------


def lease_due(
    session: Session, *, limit: int, lease: timedelta, now: datetime
) -> list[tuple[uuid.UUID, str]]:
    """Lease up to ``limit`` due jobs: move their next poll ``lease`` ahead before any call.

    ``FOR UPDATE SKIP LOCKED`` on PostgreSQL: two beats never lease one job.
    """
    query = (
        select(Job.id, Job.provider)
        .where(
            Job.status.in_(ACTIVE),
            Job.next_poll_at <= now,
            Job.upstream_task_id.is_not(None),
        )
        .order_by(Job.next_poll_at)
        .limit(limit)
    )
    if is_postgres(session):
        query = query.with_for_update(skip_locked=True)
    rows = [(row.id, row.provider) for row in session.execute(query)]
    if rows:
        session.execute(
            update(Job)
            .where(Job.id.in_([job_id for job_id, _ in rows]))
            .values(next_poll_at=now + lease)
            .execution_options(synchronize_session=False)
        )
    return rows


def renew_leases(
    session: Session, job_ids: Iterable[uuid.UUID], lease: timedelta, now: datetime
) -> None:
    """A poll task is still working on these jobs: keep them leased ``lease`` ahead."""
    until = now + lease
    session.execute(
        update(Job)
        .where(Job.id.in_(list(job_ids)), Job.status.in_(ACTIVE), Job.next_poll_at < until)
        .values(next_poll_at=until)
        .execution_options(synchronize_session=False)
    )


def poll_targets(
    session: Session, job_ids: Sequence[uuid.UUID]
) -> list[tuple[uuid.UUID, str, str | None]]:
    """(job id, upstream task id, poll URL) of the jobs still in flight among ``job_ids``."""
    return [
        (row.id, row.upstream_task_id, row.poll_url)
        for row in session.execute(
            select(Job.id, Job.upstream_task_id, Job.poll_url).where(
                Job.id.in_(job_ids), Job.status.in_(ACTIVE)
            )
        )
    ]


def record_poll_answers(
    session: Session,
    job_ids: Iterable[uuid.UUID],
    states: Mapping[str, UpstreamState],
    plan: PollPlan,
    now: datetime,
) -> None:
    """Apply what one poll answered (``states`` by upstream task id) and schedule the next."""
    jobs = session.scalars(
        select(Job)
        .where(Job.id.in_(list(job_ids)))
        .order_by(Job.id)  # a stable lock order: no deadlock with another batch
        .with_for_update()
    ).all()
    for job in jobs:
        state = states.get(job.upstream_task_id or "")
        if state is None:
            job.poll_attempts += 1
            job.next_poll_at = plan.next_at(PollReason.POLLED, now, job.poll_attempts)
            continue
        result = apply_update(session, job, state, now, record_duplicates=False)
        if job.is_terminal:
            continue
        job.poll_attempts = 0 if result.applied else job.poll_attempts + 1
        job.next_poll_at = plan.next_at(PollReason.POLLED, now, job.poll_attempts)


def reschedule_polls(
    session: Session,
    job_ids: Iterable[uuid.UUID],
    plan: PollPlan,
    message: str,
    now: datetime,
    retry_after: float | None = None,
) -> None:
    """A poll did not answer: try these jobs again later (they are leased until then)."""
    for job in session.scalars(
        select(Job)
        .where(Job.id.in_(list(job_ids)), Job.status.in_(ACTIVE))
        .order_by(Job.id)
        .with_for_update()
    ):
        job.poll_attempts += 1
        if retry_after is not None:
            job.next_poll_at = now + timedelta(seconds=retry_after)
        else:
            job.next_poll_at = plan.next_at(PollReason.POLL_FAILED, now, job.poll_attempts)
        if job.poll_attempts % 5 == 1:  # enough to explain a delay, not one row per poll
            record_event(session, job, Source.POLL, f"poll failed: {message}")


def push_back_provider(session: Session, provider: str, until: datetime) -> int:
    """A provider said "slow down": none of its in-flight jobs is polled before ``until``."""
    pushed = session.execute(
        update(Job)
        .where(
            Job.provider == provider,
            Job.status.in_(ACTIVE),
            func.coalesce(Job.next_poll_at, until) < until,
        )
        .values(next_poll_at=until)
        .execution_options(synchronize_session=False)
    )
    count: int = pushed.rowcount  # type: ignore[attr-defined]
    return count


# --- the sweep ---------------------------------------------------------------------------


def fail_overdue(session: Session, now: datetime, limit: int, skip_locked: bool) -> list[uuid.UUID]:
    """Jobs past their deadline fail with ``timeout``, whatever the provider is doing."""
    failed = []
    overdue = select(Job).where(Job.status.in_(NOT_TERMINAL), Job.deadline < now)
    for job in session.scalars(overdue.limit(limit).with_for_update(skip_locked=skip_locked)):
        message = f"not finished by its deadline {job.deadline.isoformat()}"
        _end(session, job, JobStatus.FAILED, Source.SWEEP, ErrorCode.TIMEOUT, message, now)
        failed.append(job.id)
    return failed


@dataclass
class ExpiredClaims:
    released: dict[uuid.UUID, str]  # job id -> provider: submit again
    unknown: list[uuid.UUID]  # failed: a create may have happened


def settle_expired_claims(
    session: Session,
    now: datetime,
    limit: int,
    skip_locked: bool,
    answer_grace: timedelta = timedelta(0),
) -> ExpiredClaims:
    """A submit claim expired: the worker died, or a create's outcome stayed unknown.

    Before the create call, the job is released for another attempt. After it,
    the job is never sent again: the first sweep that sees the lapse gives the
    answer ``answer_grace`` more (a worker holding it may have been unable to
    write it while the database restarted: it writes it within seconds once the
    database is back), and the next one fails the job ``submit_outcome_unknown``.
    """
    settled = ExpiredClaims({}, [])
    expired = select(Job).where(Job.status == JobStatus.QUEUED.value, Job.claimed_until < now)
    for job in session.scalars(expired.limit(limit).with_for_update(skip_locked=skip_locked)):
        if job.create_started_at is not None:
            if job.claim_token != LAPSED and answer_grace > timedelta(0):
                job.claim_token = LAPSED
                job.claimed_until = now + answer_grace
                record_event(
                    session,
                    job,
                    Source.SWEEP,
                    "submit claim lapsed after the create was sent; waiting "
                    f"{answer_grace.total_seconds():g}s for its answer",
                )
                continue
            message = f"the create call's outcome is unknown; {NOT_RESENT}"
            code = ErrorCode.SUBMIT_OUTCOME_UNKNOWN
            _end(session, job, JobStatus.FAILED, Source.SWEEP, code, message, now)
            settled.unknown.append(job.id)
            continue
        job.claim_token = None
        job.claimed_until = None
        record_event(session, job, Source.SWEEP, "submit claim expired; released for retry")
        settled.released[job.id] = job.provider
    return settled


def resend_lost(
    session: Session,
    now: datetime,
    grace: timedelta,
    limit: int,
    skip_locked: bool,
    exclude: Iterable[uuid.UUID] = (),
) -> dict[uuid.UUID, str]:
    """Queued, unclaimed and untouched for ``grace``: its message was lost. Returns the jobs
    (id -> provider) to send again; the next sweep waits another grace period."""
    skip = set(exclude)
    lost = select(Job).where(
        Job.status == JobStatus.QUEUED.value,
        Job.claimed_until.is_(None),
        or_(Job.retry_at.is_(None), Job.retry_at < now - grace),
        Job.updated_at < now - grace,
    )
    resent = {}
    for job in session.scalars(lost.limit(limit).with_for_update(skip_locked=skip_locked)):
        if job.id in skip:
            continue
        job.updated_at = now
        record_event(session, job, Source.SWEEP, "submit message overdue; sent again")
        resent[job.id] = job.provider
    return resent


def schedule_unscheduled(
    session: Session, now: datetime, limit: int, skip_locked: bool
) -> list[uuid.UUID]:
    """In flight upstream but never scheduled for a poll: poll it now."""
    scheduled = []
    unscheduled = select(Job).where(Job.status.in_(ACTIVE), Job.next_poll_at.is_(None))
    for job in session.scalars(unscheduled.limit(limit).with_for_update(skip_locked=skip_locked)):
        job.next_poll_at = now
        record_event(session, job, Source.SWEEP, "no poll was scheduled; polling now")
        scheduled.append(job.id)
    return scheduled


def unfinished_after_the_end(
    session: Session, now: datetime, grace: timedelta, window: timedelta, limit: int
) -> list[uuid.UUID]:
    """Ended, but archive/notify never finished (lost message, dead worker): offer it again;
    the next sweep waits another grace period."""
    unfinished = select(Job.id).where(
        Job.status.in_([s.value for s in TERMINAL_STATUSES]),
        Job.finalized_at.is_(None),
        Job.completed_at < now - grace,
        Job.completed_at > now - window,
        Job.updated_at < now - grace,
    )
    job_ids = list(session.scalars(unfinished.limit(limit)))
    if job_ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids))
            .values(updated_at=now)
            .execution_options(synchronize_session=False)
        )
    return job_ids


# --- after the end -----------------------------------------------------------------------


def record_archive(session: Session, job_id: uuid.UUID, urls: list[str], message: str) -> None:
    """Where the result images were archived (first writer wins)."""
    job = lock_job(session, job_id)
    if job is None or job.archived_urls:
        return
    job.archived_urls = urls
    record_event(session, job, Source.FINALIZE, message)


def record_notified(session: Session, job_id: uuid.UUID, message: str) -> None:
    job = lock_job(session, job_id)
    if job is not None:
        job.notified_at = utcnow()
        record_event(session, job, Source.FINALIZE, message)


def record_on_complete_sent(session: Session, job_id: uuid.UUID, task_name: str) -> None:
    job = lock_job(session, job_id)
    if job is not None:
        job.on_complete_sent_at = utcnow()
        record_event(session, job, Source.FINALIZE, f"sent task {task_name}")


def record_finalized(session: Session, job_id: uuid.UUID, message: str | None = None) -> None:
    """The after-the-end work is over (done, or given up with ``message``)."""
    if message is None:
        _set(session, job_id, finalized_at=utcnow())
        return
    job = lock_job(session, job_id)
    if job is not None:
        job.finalized_at = utcnow()
        record_event(session, job, Source.FINALIZE, message)


def touch(session: Session, job_id: uuid.UUID) -> None:
    """Still being worked on: the sweep leaves a recently updated job be."""
    _set(session, job_id, updated_at=utcnow())


def _set(session: Session, job_id: uuid.UUID, **values: Any) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


# --- webhooks: a task id is one job's ------------------------------------------------


class TaskIdTaken(VariflowError):
    """A webhook names, for a job without a task yet, a task another job follows."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"upstream task {task_id!r} belongs to another job")
        self.task_id = task_id


def task_owner(session: Session, provider: str, upstream_task_id: str) -> uuid.UUID | None:
    """The job of ``provider`` that follows ``upstream_task_id``, if one does."""
    return session.scalar(
        select(Job.id).where(Job.provider == provider, Job.upstream_task_id == upstream_task_id)
    )


def _accept_webhook(
    session: Session, job: Job, state: UpstreamState, plan: PollPlan, now: datetime
) -> Transition:
    if not job.is_terminal:  # a late delivery to a finished job changes no column
        job.last_webhook_at = now
    result = apply_update(session, job, state, now)
    if not job.is_terminal:
        job.next_poll_at = plan.next_at(PollReason.WEBHOOK, now)
    return result
