"""Provider capacity: on which account a job may be created now, or why it waits.

A provider account (worker/accounts.py) runs so many jobs at once, so many
creates and requests a minute, so many jobs and failed tasks a UTC day, up to a
daily spend. Before a job is claimed for its create, :func:`admit` decides, with
every worker of every host seeing the same numbers:

- **Slots and daily budgets are counted from job rows**, never kept as
  counters: a job holds a slot of its account while its claim is live, once
  its create may have been sent, and while it is submitted or processing. A
  worker that dies releases its claim when the claim expires, so it cannot leak
  a slot, and a row that ended frees its slot in the same commit.
- **Admission is serialised per provider**: a transaction-scoped advisory lock
  on PostgreSQL, the write lock SQLite's ``BEGIN IMMEDIATE`` takes. Counting and
  claiming happen under it, so no number of workers can over-admit.
- **First in, first out per provider** (higher ``priority`` first): a job is
  admitted only if fewer jobs are ahead of it than there are free slots.
- **Rates are GCRA** with no burst: an account's next create (and request) may
  go one interval (60 / per-minute limit) after the previous one, kept as a
  time in ``account_states``; one conditional write takes a turn, so a sliding
  window of 60 s never sees more than the limit.
- **A 429 pauses the account** until Retry-After, and transient failures in a
  row open its **circuit breaker** for the cool-down, after which one probe job
  decides (:func:`record_outcome`).

The decision is a :class:`Decision`: an account, or the reason to wait (with
the time it ends, for reasons that end with time), or to fail at once (a
budget under ``VARIFLOW_BUDGET_POLICY=fail``).
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any

from sqlalchemy import (
    Integer,
    Table,
    and_,
    bindparam,
    case,
    func,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import BindParameter

from worker import jobs
from worker.accounts import Account, Limits
from worker.db import is_postgres
from worker.errors import ErrorCode
from worker.models import AccountState, Job
from worker.states import JobStatus

IN_FLIGHT = (JobStatus.SUBMITTED.value, JobStatus.PROCESSING.value)
# The most waiting jobs one admission wakes (each admitted one wakes more).
MAX_WAKE = 8
# How long a woken job's submit may take to reach admission before its wake is sent
# again (a message lost with a broker): well beyond a queue's usual delay.
WAKE_IN_TRANSIT = timedelta(seconds=30)
# What PiAPI counts as an "incorrect task": the provider failed or refused the job.
UPSTREAM_FAILURES = (ErrorCode.UPSTREAM_FAILED.value, ErrorCode.UPSTREAM_REJECTED.value)


@dataclass(frozen=True)
class Usage:
    """What one account holds now and used today (UTC), counted from job rows."""

    in_flight: int = 0
    jobs_today: int = 0
    failed_today: int = 0
    reported_spend: float = 0.0  # what the provider said today's ended jobs cost
    unpriced_jobs: int = 0  # jobs completed today whose provider reported no cost...
    unpriced_images: int = 0  # ...and their result images (for a configured price)

    def spend(self, limits: Limits) -> float:
        """Today's spend: the provider's reports, else the account's prices."""
        return (
            self.reported_spend
            + self.unpriced_jobs * (limits.price_per_job or 0.0)
            + self.unpriced_images * (limits.price_per_image or 0.0)
        )


@dataclass(frozen=True)
class Decision:
    account: Account | None = None  # admitted: create the job with this account
    reason: str | None = None  # why it waits (or fails)
    until: datetime | None = None  # when that reason ends by itself (None: a job's end)
    fail: bool = False  # a budget is exhausted and the policy is to fail at once
    ahead: int = 0  # jobs of the provider before this one in the queue
    room: bool = False  # waits only for earlier jobs, though an account has room now
    spare: int = 0  # admitted, and this many more could be now: wake as many

    @property
    def admitted(self) -> bool:
        return self.account is not None


@dataclass(frozen=True)
class _Block:
    reason: str
    until: datetime | None
    budget: bool = False


def slot_limited(accounts: Sequence[Account]) -> bool:
    """Whether any account has slots: only then does a job's end free one, and only then
    is a polled job's end worth noticing early."""
    return any(account.limits.max_in_flight is not None for account in accounts)


def limited(accounts: Sequence[Account]) -> bool:
    """Whether admission has anything to decide (several accounts, or any limit)."""
    return len(accounts) > 1 or any(not a.limits.unlimited for a in accounts)


def next_utc_day(now: datetime) -> datetime:
    return datetime.combine(now.date() + timedelta(days=1), time(), tzinfo=now.tzinfo)


def admit(
    session: Session,
    accounts: Sequence[Account],
    job: Job,
    now: datetime,
    *,
    budget_policy: str = "wait",
    breaker_threshold: int = 5,
    breaker_cooldown: float = 60.0,
    ahead: int | None = None,
) -> Decision:
    """Decide for the queued ``job`` (its row, read by the caller), within the caller's
    transaction; when admitted, the account's rate turns are taken (the caller then
    claims the job with the account in the same transaction). ``ahead``: the job's
    place in line (:func:`jobs_ahead`) when the caller read it before the lock."""
    provider = job.provider
    lock_provider(session, provider)
    states = _states(session, provider)
    usage = usage_by_account(session, provider, now, daily=_counts_days(accounts))
    blocks: list[_Block] = []
    open_accounts: list[tuple[Account, float, int]] = []
    for account in accounts:
        block = _blocked(
            account,
            states.get(account.name),
            usage.get(account.name, Usage()),
            now,
            job.id,
            breaker_threshold,
            breaker_cooldown,
        )
        if block is not None:
            blocks.append(block)
            continue
        limit = held_at_most(account.limits)
        in_flight = usage.get(account.name, Usage()).in_flight
        free = float("inf") if limit is None else float(limit - in_flight)
        if free <= 0:
            blocks.append(_Block(f"waiting for a slot: {_slots(account, in_flight)}", None))
            continue
        open_accounts.append((account, free, in_flight))
    if ahead is None:
        ahead = jobs_ahead(session, job, now, line_cap(accounts))
    if not open_accounts:
        if budget_policy == "fail" and blocks and all(b.budget for b in blocks):
            return Decision(reason=blocks[0].reason, fail=True, ahead=ahead)
        timed = [b.until for b in blocks if b.until is not None]
        return Decision(reason=_reason(blocks), until=min(timed) if timed else None, ahead=ahead)
    free_total = sum(free for _, free, _ in open_accounts)
    if ahead >= free_total:
        return Decision(reason=_in_line(accounts, ahead), ahead=ahead, room=True)
    # The most free slots; among unlimited accounts, the fewest in flight.
    account = max(open_accounts, key=lambda entry: (entry[1], -entry[2]))[0]
    _take_turns(session, account, states.get(account.name), now, job.id)
    # More jobs that could be admitted right now: slots free on accounts whose next
    # turn is not spaced out by a rate (those would only wake to wait again).
    unpaced = sum(free for entry, free, _ in open_accounts if not paced(entry))
    spare = max(0.0, unpaced - ahead - 1) if not paced(account) else 0.0
    return Decision(account=account, ahead=ahead, spare=int(min(spare, MAX_WAKE)))


def room_now(
    session: Session,
    accounts: Sequence[Account],
    now: datetime,
    *,
    breaker_threshold: int = 5,
    breaker_cooldown: float = 60.0,
) -> int:
    """How many waiting jobs of the provider could be admitted now (at most MAX_WAKE):
    the free slots of its accounts that nothing else blocks, one for an account whose
    next turn is spaced out by a rate (its job then waits for the turn on a timer).

    Read without the admission lock: an estimate for waking, never for admitting. A
    wake that counts "free slots now" rather than "one per ended job" heals itself:
    a wake lost (a woken job claimed by another path, a message dropped) is made good
    by the next job's end, instead of leaving a slot idle until the sweep."""
    if not accounts:
        return 0
    provider = accounts[0].provider
    states = _states(session, provider)
    usage = usage_by_account(session, provider, now, daily=_counts_days(accounts))
    room = 0
    for account in accounts:
        held = usage.get(account.name, Usage())
        state = states.get(account.name)
        if _blocked(account, state, held, now, None, breaker_threshold, breaker_cooldown):
            continue
        limit = held_at_most(account.limits)
        free = MAX_WAKE if limit is None else max(0, limit - held.in_flight)
        room += min(free, 1) if paced(account) else free
    return min(room, MAX_WAKE)


def to_wake(
    session: Session,
    accounts: Sequence[Account],
    now: datetime,
    *,
    at_least: int = 0,
    breaker_threshold: int = 5,
    breaker_cooldown: float = 60.0,
) -> list[uuid.UUID]:
    """Wake the waiting jobs of the provider there is room for now (:func:`room_now`),
    and at least ``at_least`` (the sweep wakes the head even without room: a job waiting
    on a timer whose message was lost); the caller sends their submits. The first jobs
    in line are woken, but those woken already and still on their way, whose slots
    these are."""
    if not accounts:
        return []
    room = room_now(
        session,
        accounts,
        now,
        breaker_threshold=breaker_threshold,
        breaker_cooldown=breaker_cooldown,
    )
    return wake_next(session, accounts[0].provider, max(room, at_least), now)


def wake_next(
    session: Session, provider: str, count: int, now: datetime, but: uuid.UUID | None = None
) -> list[uuid.UUID]:
    """Wake the first ``count`` jobs in the provider's line (but ``but``), skipping those
    woken already and still on their way (worker/jobs.py marks them)."""
    if count <= 0:
        return []
    return jobs.wake_waiting(session, provider, count, now, WAKE_IN_TRANSIT, but)


def surely_waits(accounts: Sequence[Account], ahead: int) -> str | None:
    """The reason a job with ``ahead`` earlier jobs in line waits, when that is certain
    without the admission lock (None: only admission can tell).

    Admission lets a job go only when fewer jobs are ahead of it than its provider has
    free slots; with so many ahead that every slot of every account (and MAX_WAKE more,
    for jobs ahead that are admitted meanwhile) would not reach it, it waits whatever
    the lock would show. A burst of thousands of jobs is marked waiting this way
    without queueing for the lock that the jobs being refilled need."""
    if not accounts:
        return None
    slots = [held_at_most(account.limits) for account in accounts]
    if any(limit is None for limit in slots):
        return None
    if ahead < sum(limit or 0 for limit in slots) + MAX_WAKE:
        return None
    return _in_line(accounts, ahead)


def _in_line(accounts: Sequence[Account], ahead: int) -> str:
    cap = line_cap(accounts)
    place = f"{ahead}+" if cap is not None and ahead >= cap else str(ahead)
    return f"waiting for a slot: {place} earlier jobs of {accounts[0].provider} go first"


def held_at_most(limits: Limits) -> int | None:
    """How many jobs an account may hold: its slots, and those its provider stages."""
    if limits.max_in_flight is None:
        return None
    return limits.max_in_flight + (limits.max_staged or 0)


def _slots(account: Account, in_flight: int) -> str:
    limits = account.limits
    staged = f" (+{limits.max_staged} staged upstream)" if limits.max_staged else ""
    return f"{in_flight}/{limits.max_in_flight}{staged} in flight on {account.label}"


def paced(account: Account) -> bool:
    """Whether the account's creates are spaced out by a rate (its next turn may be later)."""
    limits = account.limits
    return limits.creates_per_minute is not None or limits.requests_per_minute is not None


def _reason(blocks: list[_Block]) -> str:
    if len(blocks) == 1:
        return blocks[0].reason
    return "; ".join(dict.fromkeys(b.reason for b in blocks))[:255]


def _blocked(
    account: Account,
    state: AccountState | None,
    usage: Usage,
    now: datetime,
    job_id: uuid.UUID | None,
    breaker_threshold: int,
    breaker_cooldown: float = 60.0,
) -> _Block | None:
    """Why nothing may be created on the account now, if anything; ``job_id``: the job
    asking (it may be the breaker's probe), None to ask for any job."""
    limits = account.limits
    label = account.label
    if state is not None:
        if state.paused_until is not None and state.paused_until > now:
            why = state.pause_reason or "the provider asked to slow down"
            return _Block(
                f"paused until {_hms(state.paused_until)} on {label}: {why}", state.paused_until
            )
        if state.opened_until is not None and state.failures >= breaker_threshold:
            if state.opened_until > now:
                return _Block(
                    f"circuit open until {_hms(state.opened_until)} on {label} "
                    f"({state.failures} failures in a row)",
                    state.opened_until,
                )
            probe_until = state.opened_until + timedelta(seconds=breaker_cooldown)
            probing = state.probe_job_id is not None and state.probe_job_id != job_id
            if probing and probe_until > now:
                # One probe at a time; a probe that never reported (its worker died)
                # gives way to another after a cool-down.
                return _Block(f"circuit half open on {label}: one probe job decides", probe_until)
    tomorrow = next_utc_day(now)
    if limits.daily_jobs is not None and usage.jobs_today >= limits.daily_jobs:
        return _Block(
            f"daily budget of {limits.daily_jobs} jobs reached on {label}: resumes 00:00 UTC",
            tomorrow,
            budget=True,
        )
    if limits.daily_failed is not None and usage.failed_today >= limits.daily_failed:
        return _Block(
            f"daily budget of {limits.daily_failed} failed tasks reached on {label}: "
            "resumes 00:00 UTC",
            tomorrow,
            budget=True,
        )
    if limits.daily_spend_cap is not None and usage.spend(limits) >= limits.daily_spend_cap:
        return _Block(
            f"daily spend cap of {limits.daily_spend_cap:g} reached on {label}: resumes 00:00 UTC",
            tomorrow,
            budget=True,
        )
    if state is not None:
        for turn, per_minute, what in (
            (state.next_create_at, limits.creates_per_minute, "creates"),
            (state.next_request_at, limits.requests_per_minute, "requests"),
        ):
            if per_minute is not None and turn is not None and turn > now:
                return _Block(f"rate limit of {per_minute} {what} a minute on {label}", turn)
    return None


def _hms(moment: datetime) -> str:
    return moment.strftime("%H:%M:%S UTC")


def lock_provider(session: Session, provider: str) -> None:
    """Serialise admissions of one provider until the transaction ends (PostgreSQL;
    SQLite's BEGIN IMMEDIATE already holds the database's write lock). Asking again
    in the same transaction costs nothing (the lock is held until it ends)."""
    if not is_postgres(session):
        return
    transaction = session.get_transaction()
    held: dict[str, object] = session.info.setdefault("variflow_admission_locks", {})
    if transaction is not None and held.get(provider) is transaction:
        return
    key = int.from_bytes(
        hashlib.sha256(f"variflow:{provider}".encode()).digest()[:8], "big", signed=True
    )
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
    held[provider] = session.get_transaction()


def _states(session: Session, provider: str) -> dict[str, AccountState]:
    rows = session.scalars(_STATES, {"provider": provider})
    return {row.account: row for row in rows}


_STATES = select(AccountState).where(AccountState.provider == bindparam("provider"))


def _counts_days(accounts: Sequence[Account]) -> bool:
    """Whether admission needs today's counts (an account has a daily budget or cap)."""
    return any(
        limits.daily_jobs is not None
        or limits.daily_failed is not None
        or limits.daily_spend_cap is not None
        for limits in (account.limits for account in accounts)
    )


def usage_by_account(
    session: Session, provider: str, now: datetime, *, daily: bool = True
) -> dict[str, Usage]:
    """Each account's slots in use and today's jobs, failed tasks and spend, in one query.

    ``daily`` False: only the slots in use (the other counts are left 0). Admission asks
    that for accounts without daily budgets: the day's counts read every row the
    provider ended today, a cost that grows with each job of the day, while the slots
    in use are read from the few rows that hold one."""
    if not daily:
        held = session.execute(_slots_statement(), {"provider": provider, "now": now})
        return {str(account): Usage(in_flight=int(n)) for account, n in held}
    day = datetime.combine(now.date(), time(), tzinfo=now.tzinfo)
    holding = _holding(now)
    failed_today = and_(
        Job.status == JobStatus.FAILED.value,
        Job.error_code.in_(UPSTREAM_FAILURES),
        Job.completed_at >= day,
    )
    unpriced = and_(
        Job.status == JobStatus.COMPLETED.value, Job.completed_at >= day, Job.cost.is_(None)
    )
    images = _array_length(session, Job.result_urls)
    rows = session.execute(
        select(
            Job.account,
            func.sum(case((holding, 1), else_=0)),
            func.sum(
                case((or_(Job.submitted_at >= day, Job.create_started_at >= day), 1), else_=0)
            ),
            func.sum(case((failed_today, 1), else_=0)),
            func.sum(case((Job.completed_at >= day, func.coalesce(Job.cost, 0.0)), else_=0.0)),
            func.sum(case((unpriced, 1), else_=0)),
            func.sum(case((unpriced, func.coalesce(images, 0)), else_=0)),
        )
        .where(
            Job.provider == provider,
            Job.account.is_not(None),
            or_(holding, Job.create_started_at >= day, Job.completed_at >= day),
        )
        .group_by(Job.account)
    )
    return {
        account: Usage(
            int(held or 0),
            int(jobs or 0),
            int(failed or 0),
            float(spend or 0.0),
            int(unpriced_jobs or 0),
            int(unpriced_images or 0),
        )
        for account, held, jobs, failed, spend, unpriced_jobs, unpriced_images in rows
    }


def _array_length(session: Session, column: Any) -> Any:
    # The number of result images of a row (a JSON array), on either database.
    if is_postgres(session):
        return func.jsonb_array_length(column)
    return func.json_array_length(column)


def _holding(now: datetime | BindParameter[datetime]) -> Any:
    """A job that holds a slot of its account: in flight, or being created."""
    column = jobs.JOBS.c
    return or_(
        column.status.in_(IN_FLIGHT),
        and_(
            column.status == JobStatus.QUEUED.value,
            or_(column.create_started_at.is_not(None), column.claimed_until > now),
        ),
    )


@functools.cache
def _slots_statement() -> Any:
    """The slots each account of a provider holds, built once (values bound at execution):
    every admission and every job's end on a slot-limited provider runs it."""
    column = jobs.JOBS.c
    return (
        select(column.account, func.count())
        .where(
            column.provider == bindparam("provider", type_=column.provider.type),
            column.account.is_not(None),
            _holding(bindparam("now", type_=column.claimed_until.type)),
        )
        .group_by(column.account)
    )


def jobs_ahead(session: Session, job: Job, now: datetime, at_most: int | None = None) -> int:
    """Queued jobs of the provider before ``job`` that nobody is submitting (FIFO,
    higher priority first; a job waiting out its own retry backoff is not in line),
    counted up to ``at_most`` (:func:`line_cap`: a count that stops there decides the
    same, and does not read the whole line for each job of a burst)."""
    values = {
        "provider": job.provider,
        "priority": job.priority,
        "created_at": job.created_at,
        "id": job.id,
        "now": now,
        "at_most": at_most,
    }
    count = session.scalar(_ahead_statement(at_most is not None), values)
    return int(count or 0)


@functools.cache
def _ahead_statement(capped: bool) -> Any:
    """jobs_ahead's count, built once per shape (values bound at execution): every
    admission runs it, and building it on each call showed in profiles."""
    table = jobs.JOBS
    column = table.c
    priority = bindparam("priority", type_=column.priority.type)
    created_at = bindparam("created_at", type_=column.created_at.type)
    now = bindparam("now", type_=column.created_at.type)
    before = or_(
        column.priority > priority,
        and_(
            column.priority == priority,
            or_(
                column.created_at < created_at,
                and_(
                    column.created_at == created_at,
                    column.id < bindparam("id", type_=column.id.type),
                ),
            ),
        ),
    )
    line = (
        select(literal(1))
        .select_from(table)
        .where(
            column.provider == bindparam("provider", type_=column.provider.type),
            column.status == JobStatus.QUEUED.value,
            column.create_started_at.is_(None),
            or_(column.claimed_until.is_(None), column.claimed_until <= now),
            or_(column.retry_at.is_(None), column.retry_at <= now),
            column.deadline > now,
            before,
        )
    )
    if capped:
        line = line.limit(bindparam("at_most", type_=Integer))
    return select(func.count()).select_from(line.subquery())


# Places in line shown exactly in a waiting reason ("37 earlier jobs"); beyond, "100+".
PLACES_SHOWN = 100


def line_cap(accounts: Sequence[Account]) -> int | None:
    """How far a job's place in line needs counting: past every slot of the provider's
    accounts (staged ones too) and MAX_WAKE more, admission and :func:`surely_waits`
    decide alike, and PLACES_SHOWN are shown. None: an account without a slot limit
    could take any number of jobs, so the whole line counts."""
    slots = [held_at_most(account.limits) for account in accounts]
    if not slots or any(limit is None for limit in slots):
        return None
    return max(sum(limit or 0 for limit in slots) + MAX_WAKE, PLACES_SHOWN)


def _take_turns(
    session: Session, account: Account, state: AccountState | None, now: datetime, job_id: uuid.UUID
) -> None:
    """The admitted create's rate turns (and the breaker's probe, when half open)."""
    values: dict[str, object] = {"updated_at": now}
    for column, per_minute, turn in (
        ("next_create_at", account.limits.creates_per_minute, state and state.next_create_at),
        ("next_request_at", account.limits.requests_per_minute, state and state.next_request_at),
    ):
        if per_minute is not None:
            start = max(turn, now) if isinstance(turn, datetime) else now
            values[column] = start + timedelta(seconds=60.0 / per_minute)
    if state is not None and state.opened_until is not None and state.opened_until <= now:
        # Half open: this job is the probe. The cool-down is counted again from now,
        # so a probe that never reports gives way to another one cool-down later.
        values["probe_job_id"] = job_id
        values["opened_until"] = now
    if len(values) > 1:  # an account without rates and a closed breaker: nothing to note
        _upsert(session, account, values)


def take_request_turn(session: Session, account: Account, now: datetime) -> datetime | None:
    """A turn for one request (a poll, a cancel) under the account's requests per minute:
    None when taken, else the time the next turn comes."""
    per_minute = account.limits.requests_per_minute
    if per_minute is None:
        return None
    interval = timedelta(seconds=60.0 / per_minute)
    _upsert(session, account, {"updated_at": now})
    taken = session.execute(
        update(AccountState)
        .where(
            AccountState.provider == account.provider,
            AccountState.account == account.name,
            or_(AccountState.next_request_at.is_(None), AccountState.next_request_at <= now),
        )
        .values(next_request_at=literal(now + interval), updated_at=now)
    ).rowcount  # type: ignore[attr-defined]
    if taken:
        return None
    return session.scalar(
        select(AccountState.next_request_at).where(
            AccountState.provider == account.provider, AccountState.account == account.name
        )
    )


def pause(session: Session, account: Account, until: datetime, reason: str, now: datetime) -> None:
    """The provider refused for load (429): no create on the account before ``until``."""
    _upsert(
        session, account, {"paused_until": until, "pause_reason": reason[:255], "updated_at": now}
    )


def record_outcome(
    session: Session,
    account: Account,
    job_id: uuid.UUID,
    *,
    transient_failure: bool,
    now: datetime,
    threshold: int,
    cooldown: float,
) -> None:
    """A create's outcome for the account's breaker: a transient failure counts (at the
    threshold, or when the probe failed, it opens for ``cooldown``); anything else closes it."""
    state = session.get(AccountState, (account.provider, account.name))
    if not transient_failure:
        if state is not None and (state.failures or state.probe_job_id is not None):
            _upsert(
                session,
                account,
                {"failures": 0, "opened_until": None, "probe_job_id": None, "updated_at": now},
            )
        return
    failures = (state.failures if state is not None else 0) + 1
    values: dict[str, object] = {"failures": failures, "updated_at": now, "probe_job_id": None}
    if failures >= threshold:
        values["opened_until"] = now + timedelta(seconds=cooldown)
    _upsert(session, account, values)


def record_success(session: Session, account: Account, now: datetime) -> bool:
    """A create that did not fail transiently closes the account's breaker: failures in a
    row back to 0, no probe. :func:`record_outcome`'s success in one conditional write,
    which changes nothing (and is the only statement) when nothing was noted, as for
    nearly every create."""
    values = {"of_provider": account.provider, "of_account": account.name, "now": now}
    cleared = session.execute(_CLEAR_BREAKER, values).rowcount  # type: ignore[attr-defined]
    return bool(cleared)


# Built once: it follows nearly every create. On the table, not the ORM entity, so an
# AccountState the caller's session already holds is not brought in step with it: call
# it in a session that has not read the account's state (submit does, in its own).
_ACCOUNT_STATES: Table = AccountState.__table__  # type: ignore[assignment]
_CLEAR_BREAKER = (
    update(_ACCOUNT_STATES)
    .where(
        # (An UPDATE's parameters may not be named after its columns.)
        _ACCOUNT_STATES.c.provider == bindparam("of_provider"),
        _ACCOUNT_STATES.c.account == bindparam("of_account"),
        or_(_ACCOUNT_STATES.c.failures > 0, _ACCOUNT_STATES.c.probe_job_id.is_not(None)),
    )
    .values(
        failures=0,
        opened_until=None,
        probe_job_id=None,
        updated_at=bindparam("now", type_=_ACCOUNT_STATES.c.updated_at.type),
    )
)


def _upsert(session: Session, account: Account, values: dict[str, object]) -> None:
    insert = pg_insert if is_postgres(session) else sqlite_insert
    statement = insert(AccountState).values(
        provider=account.provider, account=account.name, **({"failures": 0} | values)
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[AccountState.provider, AccountState.account],
            set_={k: statement.excluded[k] for k in values},
        )
    )


def waiting_head(session: Session, provider: str, limit: int, now: datetime) -> list[uuid.UUID]:
    """The first ``limit`` jobs of the provider's queue that wait for capacity."""
    return jobs.line_head(session, provider, limit, now)


@dataclass(frozen=True)
class AccountStatus:
    """An account as operators see it (`variflow accounts`, the dashboard, metrics)."""

    account: Account
    usage: Usage
    spend_today: float  # usage.spend(account.limits): reported costs, else configured prices
    waiting: int  # the provider's jobs waiting for capacity (shared by its accounts)
    paused_until: datetime | None
    pause_reason: str | None
    breaker: str  # "closed", "open" or "half-open"
    opened_until: datetime | None
    failures: int


def snapshot(
    session: Session, accounts: Sequence[Account], now: datetime, breaker_threshold: int
) -> list[AccountStatus]:
    """Every given account's slots in use, today's budgets and health, read now."""
    found: list[AccountStatus] = []
    by_provider: dict[str, list[Account]] = {}
    for account in accounts:
        by_provider.setdefault(account.provider, []).append(account)
    for provider, own in by_provider.items():
        usage = usage_by_account(session, provider, now)
        states = _states(session, provider)
        waiting = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(
                Job.provider == provider,
                Job.status == JobStatus.QUEUED.value,
                Job.waiting_reason.is_not(None),
            )
        )
        for account in own:
            state = states.get(account.name)
            failures = state.failures if state is not None else 0
            opened = state.opened_until if state is not None else None
            breaker = "closed"
            if opened is not None and failures >= breaker_threshold:
                breaker = "open" if opened > now else "half-open"
            paused = state.paused_until if state is not None else None
            found.append(
                AccountStatus(
                    account=account,
                    usage=usage.get(account.name, Usage()),
                    spend_today=usage.get(account.name, Usage()).spend(account.limits),
                    waiting=int(waiting or 0),
                    paused_until=paused if paused is not None and paused > now else None,
                    pause_reason=state.pause_reason if state is not None else None,
                    breaker=breaker,
                    opened_until=opened,
                    failures=failures,
                )
            )
    return found
