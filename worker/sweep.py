"""The sweep: the safety net that makes "no job lost, none stuck forever" true.

Run by beat every ``VARIFLOW_SWEEP_INTERVAL``. Each action is recorded as a
job event, and each is safe to repeat.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import or_, select, update

from worker.config import Settings
from worker.db import is_postgres, session_scope
from worker.jobs import apply_update, record_event
from worker.models import Job, utcnow
from worker.states import TERMINAL_STATUSES, JobStatus, Source, UpstreamState

log = logging.getLogger(__name__)

OUTCOME_UNKNOWN = "submit_outcome_unknown"
NOT_RESENT = "the provider may have created the task, so it was not sent again (no double charge)"
NOT_TERMINAL = [s.value for s in JobStatus if not s.is_terminal]

SWEEP_LIMIT = 500
TIMEOUT = "timeout"


@dataclass
class SweepReport:
    resent: list[uuid.UUID] = field(default_factory=list)
    released: list[uuid.UUID] = field(default_factory=list)
    timed_out: list[uuid.UUID] = field(default_factory=list)
    rescheduled: list[uuid.UUID] = field(default_factory=list)
    unknown: list[uuid.UUID] = field(default_factory=list)
    refinalize: list[uuid.UUID] = field(default_factory=list)
    providers: dict[uuid.UUID, str] = field(default_factory=dict)

    @property
    def to_submit(self) -> list[uuid.UUID]:
        return self.resent + self.released


def sweep(settings: Settings) -> SweepReport:
    """Decide what to repair and write it; the caller sends messages afterwards."""
    report = SweepReport()
    now = utcnow()
    grace = timedelta(seconds=settings.lost_message_grace)
    with session_scope() as session:
        skip_locked = is_postgres(session)

        # Past the deadline: fail, whatever the provider is doing.
        overdue = select(Job).where(Job.status.in_(NOT_TERMINAL), Job.deadline < now)
        for job in session.scalars(
            overdue.limit(SWEEP_LIMIT).with_for_update(skip_locked=skip_locked)
        ):
            apply_update(
                session,
                job,
                UpstreamState(
                    JobStatus.FAILED,
                    Source.SWEEP,
                    error_code=TIMEOUT,
                    error_message=f"not finished by its deadline {job.deadline.isoformat()}",
                ),
                now,
            )
            report.timed_out.append(job.id)

        # A submit claim expired: the worker died, or a create's outcome stayed
        # unknown. Before the create call, retry; after it, never re-send.
        expired = select(Job).where(Job.status == JobStatus.QUEUED.value, Job.claimed_until < now)
        for job in session.scalars(
            expired.limit(SWEEP_LIMIT).with_for_update(skip_locked=skip_locked)
        ):
            if job.create_started_at is not None:
                apply_update(
                    session,
                    job,
                    UpstreamState(
                        JobStatus.FAILED,
                        Source.SWEEP,
                        error_code=OUTCOME_UNKNOWN,
                        error_message=f"the create call's outcome is unknown; {NOT_RESENT}",
                    ),
                    now,
                )
                report.unknown.append(job.id)
                continue
            job.claim_token = None
            job.claimed_until = None
            record_event(session, job, Source.SWEEP, "submit claim expired; released for retry")
            report.released.append(job.id)
            report.providers[job.id] = job.provider

        # Queued, unclaimed and not touched for a while: its message was lost.
        lost = select(Job).where(
            Job.status == JobStatus.QUEUED.value,
            Job.claimed_until.is_(None),
            or_(Job.retry_at.is_(None), Job.retry_at < now - grace),
            Job.updated_at < now - grace,
        )
        for job in session.scalars(
            lost.limit(SWEEP_LIMIT).with_for_update(skip_locked=skip_locked)
        ):
            if job.id in report.released:
                continue
            job.updated_at = now  # the next sweep waits another grace period
            record_event(session, job, Source.SWEEP, "submit message overdue; sent again")
            report.resent.append(job.id)
            report.providers[job.id] = job.provider

        # In flight upstream but never scheduled for a poll: schedule it now.
        unscheduled = select(Job).where(
            Job.status.in_([JobStatus.SUBMITTED.value, JobStatus.PROCESSING.value]),
            Job.next_poll_at.is_(None),
        )
        for job in session.scalars(
            unscheduled.limit(SWEEP_LIMIT).with_for_update(skip_locked=skip_locked)
        ):
            job.next_poll_at = now
            record_event(session, job, Source.SWEEP, "no poll was scheduled; polling now")
            report.rescheduled.append(job.id)

        # Ended, but the after-the-end work (archive, notify, the application's
        # task) never finished: its message was lost or its worker died.
        window = timedelta(seconds=settings.notify_retry_for)
        unfinished = select(Job.id).where(
            Job.status.in_([s.value for s in TERMINAL_STATUSES]),
            Job.finalized_at.is_(None),
            Job.completed_at < now - grace,
            Job.completed_at > now - window,
            Job.updated_at < now - grace,
        )
        report.refinalize = list(session.scalars(unfinished.limit(SWEEP_LIMIT)))
        if report.refinalize:
            session.execute(
                update(Job)
                .where(Job.id.in_(report.refinalize))
                .values(updated_at=now)  # the next sweep waits another grace period
                .execution_options(synchronize_session=False)
            )
    return report
