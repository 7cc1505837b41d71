"""Writing a job's state: the only code that turns a Transition into rows.

Every change of status in variflow goes through :func:`apply_update`, which
locks the row, asks :func:`worker.states.transition` what to do, writes it and
records the event.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.hooks import TerminalJob, note_terminal
from worker.models import Job, JobEvent, utcnow
from worker.states import EventKind, JobStatus, Source, Transition, UpstreamState, transition

log = logging.getLogger(__name__)


def lock_job(session: Session, job_id: uuid.UUID) -> Job | None:
    """Load a job holding its row lock (PostgreSQL) until the transaction ends."""
    return session.scalars(
        select(Job)
        .where(Job.id == job_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()


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
        session.add(
            JobEvent(
                job_id=job.id,
                at=now,
                source=event.source.value,
                kind=event.kind.value,
                from_status=event.from_status.value,
                to_status=event.to_status.value,
                message=event.message,
                payload=dict(event.payload) if event.payload else None,
            )
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
    status = JobStatus(job.status).value
    session.add(
        JobEvent(
            job_id=job.id,
            at=utcnow(),
            source=source.value,
            kind=kind.value,
            from_status=status,
            to_status=status,
            message=message,
            payload=payload,
        )
    )
