"""Polling providers for jobs that are due.

A cycle has two halves. :func:`lease_due` (run by beat's ``poll_due``) picks
due jobs in bounded batches and moves their ``next_poll_at`` forward by a lease
*before* any HTTP call, with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two
beats or workers never poll one job twice in a cycle. :func:`poll_jobs` (the
``poll_batch`` task, shared by all workers) asks the provider, one request per
provider batch, applies every answer through the transition function and sets
each job's next poll time with backoff.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import func, select, update

from worker.config import Settings
from worker.db import is_postgres, session_scope
from worker.jobs import apply_update, record_event
from worker.models import Job, utcnow
from worker.providers import get_provider
from worker.providers.base import PollTarget, Provider, TransientUpstreamError, UpstreamError
from worker.results import store_inline
from worker.states import ACTIVE_UPSTREAM_STATUSES, Source, UpstreamState

log = logging.getLogger(__name__)

ACTIVE = [s.value for s in ACTIVE_UPSTREAM_STATUSES]
# A leased job is polled again after this even if its poll task was lost.
POLL_LEASE = timedelta(seconds=120)
# Jobs per poll task for providers that answer one job per request.
SINGLE_POLL_TASK_SIZE = 20


def poll_delay(attempts: int, settings: Settings) -> float:
    """Backoff before the next poll: start * factor**attempts, capped, with a little jitter."""
    base = settings.poll_backoff_start * settings.poll_backoff_factor ** min(attempts, 64)
    return min(settings.poll_backoff_cap, base) * random.uniform(0.9, 1.0)


def first_poll_at(adapter: Provider, settings: Settings, now: datetime) -> datetime:
    """Webhook providers are polled only when no webhook came for the grace period."""
    wait = (
        settings.webhook_grace(adapter.name)
        if adapter.supports_webhook
        else settings.poll_backoff_start
    )
    return now + timedelta(seconds=wait)


def poll_at_after_webhook(provider: str, settings: Settings, now: datetime) -> datetime:
    """A webhook just arrived: fall back to polling only if the next one does not."""
    return now + timedelta(seconds=settings.webhook_grace(provider))


@dataclass(frozen=True)
class PollBatch:
    provider: str
    job_ids: tuple[uuid.UUID, ...]


def lease_due(settings: Settings, now: datetime | None = None) -> list[PollBatch]:
    """Lease one bounded batch of due jobs and split it into poll tasks by provider."""
    now = now or utcnow()
    with session_scope() as session:
        query = (
            select(Job.id, Job.provider)
            .where(
                Job.status.in_(ACTIVE),
                Job.next_poll_at <= now,
                Job.upstream_task_id.is_not(None),
            )
            .order_by(Job.next_poll_at)
            .limit(settings.poll_batch_limit)
        )
        if is_postgres(session):
            query = query.with_for_update(skip_locked=True)
        rows = session.execute(query).all()
        if not rows:
            return []
        session.execute(
            update(Job)
            .where(Job.id.in_([row.id for row in rows]))
            .values(next_poll_at=now + POLL_LEASE)
            .execution_options(synchronize_session=False)
        )
    by_provider: dict[str, list[uuid.UUID]] = defaultdict(list)
    for row in rows:
        by_provider[row.provider].append(row.id)
    batches = []
    for provider, ids in by_provider.items():
        size = get_provider(provider).batch_poll_size
        size = size if size > 1 else SINGLE_POLL_TASK_SIZE
        batches += [PollBatch(provider, tuple(ids[i : i + size])) for i in range(0, len(ids), size)]
    return batches


def poll_jobs(provider_name: str, job_ids: Sequence[uuid.UUID], settings: Settings) -> None:
    """Poll leased jobs and apply the answers; a provider batch is one request."""
    adapter = get_provider(provider_name)
    with session_scope() as session:
        targets = [
            PollTarget(row.id, row.upstream_task_id, row.poll_url)
            for row in session.execute(
                select(Job.id, Job.upstream_task_id, Job.poll_url).where(
                    Job.id.in_(job_ids), Job.status.in_(ACTIVE)
                )
            )
        ]
    size = max(1, adapter.batch_poll_size)
    for start in range(0, len(targets), size):
        chunk = targets[start : start + size]
        try:
            states = adapter.poll(chunk)
        except TransientUpstreamError as exc:
            if exc.retry_after is not None:
                # "Slow down": this task's remaining jobs (still leased) and
                # every other job of the provider wait out Retry-After.
                push_back_provider(provider_name, exc.retry_after)
                _reschedule(targets[start:], exc, settings, delay=exc.retry_after)
                return
            _reschedule(chunk, exc, settings)
            continue
        except UpstreamError as exc:
            _reschedule(chunk, exc, settings)
            continue
        except SoftTimeLimitExceeded:
            raise  # the task is out of time: the rest stays leased and is polled later
        except Exception as exc:
            log.exception("poll of %d %s job(s) failed unexpectedly", len(chunk), provider_name)
            _reschedule(chunk, UpstreamError(f"internal error: {exc!r}"), settings)
            continue
        _apply_answers(chunk, states, settings)


def _apply_answers(
    chunk: Sequence[PollTarget], states: dict[str, UpstreamState], settings: Settings
) -> None:
    # Inline (base64) results are written before any row is locked.
    for target in chunk:
        state = states.get(target.upstream_task_id)
        if state is not None and state.images:
            states[target.upstream_task_id] = store_inline(settings, target.job_id, state)
    now = utcnow()
    with session_scope() as session:
        jobs = session.scalars(
            select(Job)
            .where(Job.id.in_([t.job_id for t in chunk]))
            .order_by(Job.id)  # a stable lock order: no deadlock with another batch
            .with_for_update()
        ).all()
        for job in jobs:
            state = states.get(job.upstream_task_id or "")
            if state is None:
                job.poll_attempts += 1
                job.next_poll_at = now + timedelta(seconds=poll_delay(job.poll_attempts, settings))
                continue
            result = apply_update(session, job, state, now, record_duplicates=False)
            if job.is_terminal:
                continue
            job.poll_attempts = 0 if result.applied else job.poll_attempts + 1
            job.next_poll_at = now + timedelta(seconds=poll_delay(job.poll_attempts, settings))


def _reschedule(
    targets: Sequence[PollTarget],
    exc: UpstreamError,
    settings: Settings,
    delay: float | None = None,
) -> None:
    """A poll did not answer: try these jobs again later (they are leased until then)."""
    log.warning("poll of %d job(s) failed: %s", len(targets), exc.message)
    now = utcnow()
    with session_scope() as session:
        for job in session.scalars(
            select(Job)
            .where(Job.id.in_([t.job_id for t in targets]), Job.status.in_(ACTIVE))
            .order_by(Job.id)
            .with_for_update()
        ):
            job.poll_attempts += 1
            wait = delay if delay is not None else poll_delay(job.poll_attempts, settings)
            job.next_poll_at = now + timedelta(seconds=wait)
            if job.poll_attempts % 5 == 1:  # enough to explain a delay, not one row per poll
                record_event(session, job, Source.POLL, f"poll failed: {exc.message}")


def push_back_provider(provider: str, seconds: float) -> int:
    """A provider said "slow down": no job of it is polled for ``seconds``."""
    until = utcnow() + timedelta(seconds=seconds)
    with session_scope() as session:
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
    log.warning("%s rate-limited polling: %d job(s) pushed back %.1fs", provider, count, seconds)
    return count
