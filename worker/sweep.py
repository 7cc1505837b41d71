"""The sweep: the safety net that makes "no job lost, none stuck forever" true.

Run by beat every ``VARIFLOW_SWEEP_INTERVAL``. It decides what to repair and
has worker/jobs.py write it (each action a job event, each safe to repeat);
the caller (the Celery task) sends the messages afterwards.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from worker import capacity, jobs
from worker.errors import ErrorCode
from worker.jobs import NOT_RESENT
from worker.models import utcnow
from worker.runtime import Runtime

log = logging.getLogger(__name__)

OUTCOME_UNKNOWN = ErrorCode.SUBMIT_OUTCOME_UNKNOWN.value
TIMEOUT = ErrorCode.TIMEOUT.value
SWEEP_LIMIT = 500

__all__ = ["NOT_RESENT", "OUTCOME_UNKNOWN", "TIMEOUT", "SweepReport", "sweep"]


@dataclass
class SweepReport:
    resent: list[uuid.UUID] = field(default_factory=list)
    released: list[uuid.UUID] = field(default_factory=list)
    timed_out: list[uuid.UUID] = field(default_factory=list)
    rescheduled: list[uuid.UUID] = field(default_factory=list)
    unknown: list[uuid.UUID] = field(default_factory=list)
    refinalize: list[uuid.UUID] = field(default_factory=list)
    woken: list[uuid.UUID] = field(default_factory=list)
    providers: dict[uuid.UUID, str] = field(default_factory=dict)

    @property
    def to_submit(self) -> list[uuid.UUID]:
        return self.resent + self.released + self.woken


def sweep(runtime: Runtime) -> SweepReport:
    """Decide what to repair and write it; the caller sends messages afterwards."""
    settings = runtime.settings
    report = SweepReport()
    now = utcnow()
    grace = timedelta(seconds=settings.lost_message_grace)
    with runtime.session() as session:
        skip_locked = runtime.db.is_postgres
        report.timed_out = jobs.fail_overdue(session, now, SWEEP_LIMIT, skip_locked)
        expired = jobs.settle_expired_claims(
            session,
            now,
            SWEEP_LIMIT,
            skip_locked,
            # One more claim lifetime: a holder that is alive renews its claim (or
            # writes the answer it holds) within a third of it once the database
            # is back; only a dead one's job is failed.
            answer_grace=timedelta(seconds=settings.submit_claim_ttl),
        )
        report.unknown = expired.unknown
        report.released = list(expired.released)
        resent = jobs.resend_lost(
            session, now, grace, SWEEP_LIMIT, skip_locked, exclude=expired.released
        )
        report.resent = list(resent)
        report.providers = {**expired.released, **resent}
        report.rescheduled = jobs.schedule_unscheduled(session, now, SWEEP_LIMIT, skip_locked)
        report.refinalize = jobs.unfinished_after_the_end(
            session,
            now,
            grace,
            timedelta(seconds=settings.notify_retry_for),
            SWEEP_LIMIT,
        )
    # Jobs waiting for capacity are woken when a job ends or one is admitted; should
    # such a wake be lost, the head of each limited provider's queue is woken here. In
    # a transaction of its own, once the rows failed above are unlocked: a wake locks
    # the line in order, and holding an overdue job of the line meanwhile could
    # deadlock with a worker's wake.
    for provider in settings.provider_names:
        accounts = runtime.providers.accounts(provider)
        if not capacity.limited(accounts):
            continue
        with runtime.session() as session:
            # At least the head: a job waiting on a timer (a rate, a pause) whose retry
            # message was lost is in line too.
            head = capacity.to_wake(
                session,
                accounts,
                now,
                at_least=1,
                breaker_threshold=settings.breaker_threshold,
                breaker_cooldown=settings.breaker_cooldown,
            )
        report.woken += head
        report.providers.update(dict.fromkeys(head, provider))
    return report
