"""Polling providers for jobs that are due.

A cycle has two halves. :func:`lease_due` (run by beat's ``poll_due``) picks
due jobs in bounded batches and moves their ``next_poll_at`` forward by a lease
*before* any HTTP call, so two beats or workers never poll one job twice in a
cycle. :func:`poll_jobs` (the ``poll_batch`` task, shared by all workers) asks
the provider, one request per provider batch, and hands every answer to
worker/jobs.py, which applies it through the transition function and sets
each job's next poll time (:class:`worker.jobs.PollPlan`).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from celery.exceptions import SoftTimeLimitExceeded

from worker import capacity, jobs
from worker.accounts import Account
from worker.errors import TransientUpstreamError, UpstreamError
from worker.heartbeat import heartbeat
from worker.jobs import PollPlan
from worker.models import utcnow
from worker.providers.base import PollTarget, Provider
from worker.results import store_inline
from worker.runtime import Runtime
from worker.states import UpstreamState

log = logging.getLogger(__name__)

# Jobs per poll task for providers that answer one job per request.
SINGLE_POLL_TASK_SIZE = 20


@dataclass(frozen=True)
class PollBatch:
    provider: str
    job_ids: tuple[uuid.UUID, ...]


def plan_for(adapter: Provider, runtime: Runtime) -> PollPlan:
    return PollPlan.of(runtime.settings, adapter.webhook_grace)


def lease_due(runtime: Runtime, now: datetime | None = None) -> list[PollBatch]:
    """Lease one bounded batch of due jobs and split it into poll tasks by provider."""
    now = now or utcnow()
    lease = timedelta(seconds=runtime.settings.poll_lease)
    with runtime.session() as session:
        rows = jobs.lease_due(
            session, limit=runtime.settings.poll_batch_limit, lease=lease, now=now
        )
    by_provider: dict[str, list[uuid.UUID]] = defaultdict(list)
    for job_id, provider in rows:
        by_provider[provider].append(job_id)
    batches = []
    for provider, ids in by_provider.items():
        size = runtime.providers.get(provider).batch_poll_size
        size = size if size > 1 else SINGLE_POLL_TASK_SIZE
        batches += [PollBatch(provider, tuple(ids[i : i + size])) for i in range(0, len(ids), size)]
    return batches


class _Leases:
    """The jobs of a poll task still waiting for their answer, kept leased by a heartbeat.

    The lock keeps a renewal and the writing of answers apart: a renewal must
    not push back a job whose next poll was just scheduled.
    """

    def __init__(self, job_ids: Sequence[uuid.UUID], runtime: Runtime) -> None:
        self.waiting = set(job_ids)
        self.lock = threading.Lock()
        self.runtime = runtime

    def renew(self) -> None:
        lease = timedelta(seconds=self.runtime.settings.poll_lease)
        with self.lock:
            if self.waiting:
                with self.runtime.session() as session:
                    jobs.renew_leases(session, self.waiting, lease, utcnow())

    def done(self, job_ids: Sequence[uuid.UUID]) -> None:
        self.waiting.difference_update(job_ids)


def poll_jobs(
    provider_name: str,
    job_ids: Sequence[uuid.UUID],
    runtime: Runtime,
    *,
    lease_first: bool = False,
) -> None:
    """Poll leased jobs and apply the answers; a provider batch is one request.
    ``lease_first``: the jobs are leased here, not by beat (a job's first poll, sent
    with its submission: submit.first_poll_in); those another poll holds are left."""
    if lease_first:
        lease = timedelta(seconds=runtime.settings.poll_lease)
        with runtime.autocommit() as session:
            job_ids = jobs.lease_these(session, job_ids, lease=lease, now=utcnow())
        if not job_ids:
            return
    plan = plan_for(runtime.providers.get(provider_name), runtime)
    if _slots_awaited(provider_name, runtime):
        plan = plan.steady()
    with runtime.session() as session:
        rows = jobs.poll_targets(session, job_ids)
    # Each job is polled with the key of the account it was created with.
    by_account: dict[str | None, list[PollTarget]] = {}
    for job_id, task_id, poll_url, account in rows:
        by_account.setdefault(account, []).append(PollTarget(job_id, task_id, poll_url))
    leases = _Leases([row[0] for row in rows], runtime)
    with heartbeat(leases.renew, runtime.settings.poll_lease / 3, f"{provider_name} poll lease"):
        for account, targets in by_account.items():
            adapter = runtime.providers.for_account(provider_name, account)
            limits = _account(runtime, provider_name, account)
            _poll(adapter, targets, plan, runtime, leases, limits)


def _slots_awaited(provider: str, runtime: Runtime) -> bool:
    """Whether jobs wait for the slots of a provider whose accounts have slot limits
    (then its in-flight jobs are polled without backing off)."""
    if not capacity.slot_limited(runtime.providers.accounts(provider)):
        return False
    with runtime.autocommit() as session:
        return bool(capacity.waiting_head(session, provider, 1, utcnow()))


def _poll(
    adapter: Provider,
    targets: Sequence[PollTarget],
    plan: PollPlan,
    runtime: Runtime,
    leases: _Leases,
    account: Account | None = None,
) -> None:
    provider_name = adapter.name
    size = max(1, adapter.batch_poll_size)
    for start in range(0, len(targets), size):
        chunk = targets[start : start + size]
        wait = _request_turn(account, runtime)
        if wait is not None:
            # The account's requests a minute are spent: the rest is polled at its turn.
            with leases.lock:
                rest = targets[start:]
                limit = TransientUpstreamError(
                    f"{account.label if account else provider_name}: requests per minute reached",
                    retry_after=wait,
                )
                _reschedule(rest, limit, plan, runtime, retry_after=wait)
                leases.done([t.job_id for t in rest])
            return
        try:
            states = adapter.poll(chunk)
        except TransientUpstreamError as exc:
            if exc.retry_after is not None:
                # "Slow down": this task's remaining jobs (still leased) and
                # every other job of the provider wait out Retry-After.
                with leases.lock:
                    push_back_provider(provider_name, exc.retry_after, runtime)
                    _reschedule(targets[start:], exc, plan, runtime, retry_after=exc.retry_after)
                    leases.done([t.job_id for t in targets[start:]])
                return
            error: UpstreamError = exc
        except UpstreamError as exc:
            error = exc
        except SoftTimeLimitExceeded:
            raise  # the task is out of time: the rest stays leased and is polled later
        except Exception as exc:
            log.exception("poll of %d %s job(s) failed unexpectedly", len(chunk), provider_name)
            error = UpstreamError(f"internal error: {exc!r}")
        else:
            with leases.lock:
                _apply_answers(chunk, states, plan, runtime)
                leases.done([t.job_id for t in chunk])
            continue
        with leases.lock:
            _reschedule(chunk, error, plan, runtime)
            leases.done([t.job_id for t in chunk])


def _account(runtime: Runtime, provider: str, name: str | None) -> Account | None:
    """The job's account when its requests a minute are limited (else nothing to count)."""
    for account in runtime.providers.accounts(provider):
        if account.name == name and account.limits.requests_per_minute is not None:
            return account
    return None


def _request_turn(account: Account | None, runtime: Runtime) -> float | None:
    """None: a request may go now (its turn taken); else seconds until the next turn."""
    if account is None:
        return None
    now = utcnow()
    with runtime.session() as session:  # one conditional write takes the turn
        next_turn = capacity.take_request_turn(session, account, now)
    if next_turn is None:
        return None
    return max(0.05, (next_turn - now).total_seconds())


def _apply_answers(
    chunk: Sequence[PollTarget],
    states: dict[str, UpstreamState],
    plan: PollPlan,
    runtime: Runtime,
) -> None:
    # Inline (base64) results are written before any row is locked.
    for target in chunk:
        state = states.get(target.upstream_task_id)
        if state is not None and state.images:
            states[target.upstream_task_id] = store_inline(
                runtime.results, runtime.settings, target.job_id, state
            )
    with runtime.session() as session:
        jobs.record_poll_answers(session, [t.job_id for t in chunk], states, plan, utcnow())


def _reschedule(
    targets: Sequence[PollTarget],
    exc: UpstreamError,
    plan: PollPlan,
    runtime: Runtime,
    retry_after: float | None = None,
) -> None:
    """A poll did not answer: try these jobs again later (they are leased until then)."""
    log.warning("poll of %d job(s) failed: %s", len(targets), exc.message)
    with runtime.session() as session:
        jobs.reschedule_polls(
            session, [t.job_id for t in targets], plan, exc.message, utcnow(), retry_after
        )


def push_back_provider(provider: str, seconds: float, runtime: Runtime) -> int:
    """A provider said "slow down": no job of it is polled for ``seconds``."""
    until = utcnow() + timedelta(seconds=seconds)
    with runtime.session() as session:
        count = jobs.push_back_provider(session, provider, until)
    log.warning("%s rate-limited polling: %d job(s) pushed back %.1fs", provider, count, seconds)
    return count
