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

import functools
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import (
    Integer,
    String,
    Table,
    bindparam,
    case,
    cast,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.sql.elements import BindParameter

from worker.accounts import DEFAULT_ACCOUNT
from worker.backoff import Backoff
from worker.config import Settings
from worker.db import is_postgres
from worker.errors import ErrorCode, VariflowError
from worker.hooks import after_the_end, note_terminal
from worker.models import Job, JobEvent, JobInput, utcnow
from worker.states import (
    ACTIVE_UPSTREAM_STATUSES,
    TERMINAL_STATUSES,
    EventKind,
    JobStatus,
    Source,
    Transition,
    UpstreamState,
    leaves_task_running,
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
# The tables, for the hot paths' single statements (Core: no ORM unit of work).
JOBS: Table = Job.__table__  # type: ignore[assignment]
EVENTS: Table = JobEvent.__table__  # type: ignore[assignment]
INPUTS: Table = JobInput.__table__  # type: ignore[assignment]
_READ_ROW = select(JOBS).where(JOBS.c.id == bindparam("job_id"))
_LOCK_ROW = _READ_ROW.with_for_update()
# A guarded write that keeps finding the row changed: give up after this many reads.
GUARDED_ATTEMPTS = 5


# --- reading ------------------------------------------------------------------------------


def lock_job(session: Session, job_id: uuid.UUID) -> Job | None:
    """Load a job holding its row lock (PostgreSQL) until the transaction ends."""
    return session.scalars(
        select(Job)
        .where(Job.id == job_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()


def lock_row(session: Session, job_id: uuid.UUID) -> Job | None:
    """The job's row, locked (PostgreSQL) until the transaction ends, as a detached copy.

    Cheaper than :func:`lock_job` (no ORM load, no identity map): for the hot
    paths, which write only through this module's statements (:func:`_write`);
    changing its attributes writes nothing.
    """
    return _detached(session.execute(_LOCK_ROW, {"job_id": job_id}).first())


def read_row(session: Session, job_id: uuid.UUID) -> Job | None:
    """The job's row as a detached copy, without a lock: for a guarded write (see
    :func:`accept_webhook`)."""
    return _detached(session.execute(_READ_ROW, {"job_id": job_id}).first())


def read_by_task(session: Session, provider: str, upstream_task_id: str) -> Job | None:
    """The job following a provider's task, as a detached copy, without a lock."""
    by_task = (JOBS.c.provider == provider, JOBS.c.upstream_task_id == upstream_task_id)
    return _detached(session.execute(select(JOBS).where(*by_task)).first())


def _detached(row: Row[Any] | None) -> Job | None:
    """A row of ``jobs`` as a Job that no session tracks (written only by _write)."""
    return Job(**row._mapping) if row is not None else None


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

    def steady(self) -> PollPlan:
        """Polls at the first interval, never backing off: while jobs wait for a
        provider's slots, a slot frees only when its job's end is polled, so a
        backed-off poll would leave a paid slot idle for most of a backoff step."""
        return replace(self, backoff=replace(self.backoff, factor=1.0))

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

# What the transition decides from (states.JobLike): a guarded write checks them.
DECIDED_FROM = ("status", "progress", "upstream_task_id", "submitted_at")
# A caller's own columns, written with a transition: also(result, ends) -> columns.
Also = Callable[[Transition, bool], Mapping[str, Any]]


def apply_update(
    session: Session,
    job: Job,
    update: UpstreamState,
    now: datetime | None = None,
    *,
    record_duplicates: bool = True,
    also: Also | None = None,
) -> Transition:
    """Apply ``update`` to a job the caller has locked; the caller commits.

    ``also(result, ends)`` adds the caller's own columns (the next poll) to the
    same write; ``ends`` says whether the job is terminal after it.
    """
    result, _ = _apply(session, job, update, now or utcnow(), record_duplicates, also)
    return result


def _apply(
    session: Session,
    job: Job,
    update: UpstreamState,
    now: datetime,
    record_duplicates: bool = True,
    also: Also | None = None,
    guarded: bool = False,
    also_guard: Sequence[str] = (),
) -> tuple[Transition, bool]:
    """Decide, then write the columns and the event in one statement: the transition
    and whether it was written.

    ``guarded``: the caller read ``job`` without a lock; the write happens only if
    what the transition decided from (:data:`DECIDED_FROM`, and ``also_guard``:
    what the caller checked) is still what it read — optimistic concurrency, so
    that no transaction has to hold a lock.
    """
    result = transition(job, update, now)
    changes = dict(result.changes)
    status = JobStatus(changes.get("status", job.status))
    if also is not None:
        changes.update(also(result, status.is_terminal))
    finalized = result.became_terminal and _nothing_left(session, job, changes, status)
    if finalized:
        changes["finalized_at"] = now
    event = result.event
    if event is not None and event.duplicate and not record_duplicates:
        event = None
    if changes:
        changes.setdefault("updated_at", now)
    row = None
    if event is not None:
        row = _event_row(
            now,
            event.source,
            event.kind,
            event.from_status,
            event.to_status,
            event.message,
            dict(event.payload) if event.payload else None,
        )
    # An event-only write (an ignored update) needs no guard: it changes no column.
    guarded_columns = (*DECIDED_FROM, *also_guard)
    guard = {name: getattr(job, name) for name in guarded_columns} if guarded and changes else None
    if not _write(session, job, changes, row, guard):
        return result, False
    if result.became_terminal:
        assert job.completed_at is not None
        note_terminal(
            session,
            TerminalJob(
                job.id,
                job.provider,
                job.status,
                job.created_at,
                job.submitted_at,
                job.completed_at,
                finalized,
            ),
        )
    if event is not None:
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
    return result, True


def _nothing_left(
    session: Session, job: Job, changes: Mapping[str, Any], status: JobStatus
) -> bool:
    """The job ends now and leaves nothing for finalize_job to do (see worker.hooks)."""
    policy = after_the_end(session)
    if policy is None:
        return False
    return not policy.work_left(
        status=status.value,
        has_results=bool(changes.get("result_urls", job.result_urls)),
        notify_url=job.notify_url,
        on_complete_task=job.on_complete_task,
        stop_upstream=leaves_task_running(
            status,
            changes.get("error_code", job.error_code),
            changes.get("upstream_task_id", job.upstream_task_id),
        ),
    )


def _event_row(
    at: datetime,
    source: Source,
    kind: EventKind,
    from_status: JobStatus | None,
    to_status: JobStatus,
    message: str | None,
    payload: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "at": at,
        "source": source.value,
        "kind": kind.value,
        "from_status": from_status.value if from_status else None,
        "to_status": to_status.value,
        "message": message,
        "payload": payload,
    }


def _write(
    session: Session,
    job: Job,
    changes: Mapping[str, Any],
    event: Mapping[str, Any] | None,
    guard: Mapping[str, Any] | None = None,
) -> bool:
    """Write ``changes`` to the job's row (only while its ``guard`` columns hold those
    values, when given) and add ``event``.

    One statement on PostgreSQL (the event is inserted from the UPDATE's
    RETURNING, so it exists only if the row was written); two on SQLite. The
    loaded ``job`` is brought up to date without an ORM flush.
    """
    values: dict[str, Any] = {"job_id": job.id}
    values.update({f"set_{name}": value for name, value in changes.items()})
    values.update({f"was_{name}": value for name, value in (guard or {}).items()})
    if event is not None:
        values.update({f"event_{name}": value for name, value in event.items()})
    if not changes:
        if event is not None:
            session.execute(_INSERT_FIRST_EVENT, values)
        return True
    postgres = is_postgres(session)
    guarded = tuple(guard or ())
    change, add = _write_statements(tuple(changes), event is not None, guarded, postgres)
    # RETURNING says whether the row was written (psycopg's rowcount of an
    # INSERT fed by a data-modifying CTE is not reliable).
    written = session.execute(change, values).first() is not None
    if written and add is not None:
        session.execute(add, values)
    if not written:
        return False
    for column, value in changes.items():
        set_committed_value(job, column, value)
    return True


@functools.lru_cache(maxsize=512)
def _write_statements(
    columns: tuple[str, ...], with_event: bool, guarded: tuple[str, ...], postgres: bool
) -> tuple[Any, Any | None]:
    """The statement(s) that write these columns (and an event), built once per shape:
    values are bound at execution, so nothing is compiled per call."""
    change = (
        update(JOBS)
        .where(JOBS.c.id == bindparam("job_id"))
        .values({name: bindparam(f"set_{name}", type_=JOBS.c[name].type) for name in columns})
    )
    for name in guarded:
        column = JOBS.c[name]
        change = change.where(
            column.is_not_distinct_from(bindparam(f"was_{name}", type_=column.type))
        )
    if not with_event or not postgres:
        return change.returning(JOBS.c.id), _INSERT_FIRST_EVENT if with_event else None
    changed = change.returning(JOBS.c.id).cte("changed")
    add = insert(EVENTS).from_select(
        ["job_id", *_EVENT_VALUES], select(changed.c.id, *_EVENT_VALUES.values())
    )
    return add.returning(EVENTS.c.id), None


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
    """An event through the ORM, for the rare paths that change the job through it."""
    added = JobEvent(
        job_id=job_id, **_event_row(at, source, kind, from_status, to_status, message, payload)
    )
    session.add(added)
    return added


def note(session: Session, job_id: uuid.UUID, source: Source, message: str) -> None:
    """Record an event on a job by id (nothing if it is gone)."""
    job = lock_job(session, job_id)
    if job is not None:
        record_event(session, job, source, message)


# --- a new job ---------------------------------------------------------------------------


def _params(table: Table, prefix: str, skip: Sequence[str] = ()) -> dict[str, Any]:
    """A bound parameter per column: statements built once, values given at execution."""
    return {
        c.key: bindparam(f"{prefix}_{c.key}", type_=c.type) for c in table.c if c.key not in skip
    }


_JOB_VALUES = _params(JOBS, "job")
_EVENT_VALUES = _params(EVENTS, "event", skip=("id", "job_id"))
_INPUT_VALUES = _params(INPUTS, "input", skip=("job_id",))
_INSERT_JOB = insert(JOBS).values(_JOB_VALUES)
_INSERT_INPUT = insert(INPUTS).values(job_id=bindparam("job_id"), **_INPUT_VALUES)
_INSERT_FIRST_EVENT = (
    insert(EVENTS).values(job_id=bindparam("job_id"), **_EVENT_VALUES).returning(EVENTS.c.id)
)


def _new_job_statement(with_input: bool) -> Any:
    """PostgreSQL: the job, its input image and its first event in one statement."""
    added = _INSERT_JOB.returning(JOBS.c.id).cte("added")
    first = insert(EVENTS).from_select(
        ["job_id", *_EVENT_VALUES], select(added.c.id, *_EVENT_VALUES.values())
    )
    if with_input:
        kept = insert(INPUTS).from_select(
            ["job_id", *_INPUT_VALUES], select(added.c.id, *_INPUT_VALUES.values())
        )
        first = first.add_cte(kept.cte("kept"))
    return first.returning(EVENTS.c.id)


_NEW_JOB = {False: _new_job_statement(False), True: _new_job_statement(True)}


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
    job_id: uuid.UUID | None = None,
    tenant: str | None = None,
    request_hash: str | None = None,
    metadata: dict[str, str] | None = None,
    priority: int = 0,
) -> tuple[Job, JobEvent]:
    """A queued job, its input image and its first event (the caller commits).

    One statement on PostgreSQL. Returns the job and that event as written, so
    the caller needs no read-back (neither is attached to the session). The
    caller may choose the ``job_id``: writing it again after a lost answer then
    meets the primary key instead of making a second job.
    """
    now = now or utcnow()
    job = Job(
        id=job_id or uuid.uuid4(),
        provider=provider,
        status=JobStatus.QUEUED.value,
        params=params,
        idempotency_key=idempotency_key,
        progress=0,
        submit_attempts=0,
        poll_attempts=0,
        deadline=deadline,
        notify_url=notify_url,
        on_complete_task=on_complete_task,
        tenant=tenant,
        request_hash=request_hash,
        job_metadata=metadata,
        priority=priority,
        created_at=now,
        updated_at=now,
    )
    values = {f"job_{column.key}": getattr(job, column.key) for column in JOBS.c}
    event = _event_row(now, Source.API, EventKind.TRANSITION, None, JobStatus.QUEUED, "accepted")
    values.update({f"event_{name}": value for name, value in event.items()})
    if image is not None:
        values.update(
            input_content=image.content,
            input_filename=image.filename,
            input_content_type=image.content_type,
        )
    if is_postgres(session):
        event_id = session.execute(_NEW_JOB[image is not None], values).scalar_one()
    else:
        session.execute(_INSERT_JOB, values)
        if image is not None:
            session.execute(_INSERT_INPUT, values)
        event_id = session.execute(_INSERT_FIRST_EVENT, values).scalar_one()
    return job, JobEvent(id=event_id, job_id=job.id, **event)


def in_line(
    table: Any, provider: str | BindParameter[str], now: datetime | BindParameter[datetime]
) -> tuple[Any, ...]:
    """What puts a job of ``provider`` in its line (``table``: the jobs table or an alias):
    queued and waiting for capacity, not being submitted by anyone (values, or the
    parameters of a statement built once)."""
    return (
        table.c.provider == provider,
        table.c.status == JobStatus.QUEUED.value,
        table.c.waiting_reason.is_not(None),
        table.c.create_started_at.is_(None),
        or_(table.c.claimed_until.is_(None), table.c.claimed_until <= now),
    )


def line_order(table: Any) -> tuple[Any, ...]:
    """First in line first: higher priority, then oldest."""
    return (table.c.priority.desc(), table.c.created_at, table.c.id)


def _line_ahead() -> Any:
    """Jobs at least as urgent as a job waiting in its provider's line, first first
    (parameters: the job's provider, priority and id, and now)."""
    waiting = JOBS.alias("waiting")
    return (
        select(waiting.c.waiting_reason)
        .where(
            *in_line(
                waiting,
                bindparam("of_provider", type_=JOBS.c.provider.type),
                bindparam("now", type_=JOBS.c.created_at.type),
            ),
            waiting.c.priority >= bindparam("of_priority", type_=JOBS.c.priority.type),
            waiting.c.id != bindparam("of_id", type_=JOBS.c.id.type),
        )
        .order_by(*line_order(waiting))
        .limit(1)
    )


def _line_values(job: Job, now: datetime) -> dict[str, Any]:
    return {"of_provider": job.provider, "of_priority": job.priority, "of_id": job.id, "now": now}


# Built once (values bound at execution): every new job of a provider with limits runs
# them, and building them on each call cost milliseconds of the API's time per job.
_JOIN_THE_LINE = (
    update(JOBS)
    .where(
        JOBS.c.id == bindparam("of_id", type_=JOBS.c.id.type),
        JOBS.c.status == JobStatus.QUEUED.value,
        JOBS.c.waiting_reason.is_(None),
        _line_ahead().exists(),
    )
    .values(
        waiting_reason=_line_ahead().scalar_subquery(),
        updated_at=bindparam("now", type_=JOBS.c.updated_at.type),
    )
    .returning(JOBS.c.waiting_reason)
)
_STILL_BEHIND = select(_line_ahead().exists())


def wait_in_line(session: Session, job: Job, now: datetime) -> JobEvent | None:
    """A new job waits at once, with its event, when a job at least as urgent already
    waits in its provider's line (None: the line is empty, or holds only less urgent
    jobs; the job's own submit message then decides). Its reason is the first waiting
    job's: why the line does not move (a slot, a rate, a pause, a budget).

    First in, first out puts it behind that one, and the line's wakes (a slot freed, a
    rate turn, the sweep) reach it in turn: asking admission now would only say "wait",
    at the cost of a message and a task each, for every job of a burst. One conditional
    write decides. The caller then checks :func:`still_behind`: the job ahead may have
    been admitted, and its wake have missed this one, in the same instant."""
    reason = session.execute(_JOIN_THE_LINE, _line_values(job, now)).scalar()
    if reason is None:
        return None
    event = _event_row(now, Source.API, EventKind.INFO, JobStatus.QUEUED, JobStatus.QUEUED, reason)
    event_id = session.execute(
        _INSERT_FIRST_EVENT, {"job_id": job.id} | {f"event_{k}": v for k, v in event.items()}
    ).scalar_one()
    job.waiting_reason = reason
    return JobEvent(id=event_id, job_id=job.id, **event)


def still_behind(session: Session, job: Job, now: datetime) -> bool:
    """Whether a job that joined the line (:func:`wait_in_line`) still has a waiting job
    ahead of it; if not, the ones it waited behind went meanwhile, and their wakes may
    have come before it was in line: it must then be sent its own submit message."""
    return bool(session.scalar(_STILL_BEHIND, _line_values(job, now)))


def set_waiting(
    session: Session, job_id: uuid.UUID, reason: str, now: datetime, *, announce: bool = True
) -> bool:
    """The queued job waits for capacity (worker/capacity.py) for ``reason``: one event
    when the reason changes, none when it is the same (retries do not repeat it).
    ``announce`` False: the reason's text is kept, without an event (the caller knows
    it is the same kind of wait, e.g. for a slot, in other words)."""
    changed = session.execute(  # type: ignore[attr-defined]
        update(JOBS)
        .where(
            JOBS.c.id == job_id,
            JOBS.c.status == JobStatus.QUEUED.value,
            # Not a job another worker claimed meanwhile (admission decides from a row
            # read before its lock): that one is on its way, not waiting.
            JOBS.c.create_started_at.is_(None),
            or_(JOBS.c.claimed_until.is_(None), JOBS.c.claimed_until <= now),
            # A new reason, or a woken job back in line (the wake found no room).
            or_(
                JOBS.c.waiting_reason.is_(None),
                JOBS.c.waiting_reason != reason,
                JOBS.c.woken_at.is_not(None),
            ),
        )
        # Not woken any more: a job whose wake found no room is woken by the next free slot.
        .values(waiting_reason=reason[:255], woken_at=None, updated_at=now)
    ).rowcount
    if changed and announce:
        event = _event_row(
            now, Source.SUBMIT, EventKind.INFO, JobStatus.QUEUED, JobStatus.QUEUED, reason
        )
        session.execute(
            _INSERT_FIRST_EVENT, {"job_id": job_id} | {f"event_{k}": v for k, v in event.items()}
        )
    return bool(changed)


def wake_waiting(
    session: Session,
    provider: str,
    count: int,
    now: datetime,
    in_transit: timedelta,
    but: uuid.UUID | None = None,
) -> list[uuid.UUID]:
    """Wake the first ``count`` jobs in the provider's line that wait for capacity, but
    those already woken less than ``in_transit`` ago (their submit is on its way), and
    return the ones woken, first in line first (``but``: a job that is not to be woken,
    the one asking).

    Every job's end asks for the head of the line; without the mark, the ends that come
    before a woken job is admitted would send it again and again. Two wakers at once
    pick the same head (their reads of the line agree), and the second finds it marked
    (PostgreSQL: the rows are locked in line order, then read again; SQLite: writers
    take turns), so a slot is never woken twice. A wake whose message was lost is made
    good once ``in_transit`` has passed."""
    values = {
        "line_provider": provider,
        "now": now,
        "count": count,
        "stale": now - in_transit,
        "but": but,
    }
    statement = _wake_statement(is_postgres(session), but is not None)
    woken = session.execute(statement, values).all()
    ordered = sorted(woken, key=lambda row: (-row.priority, row.created_at, row.id))
    return [row.id for row in ordered]


def line_head(session: Session, provider: str, count: int, now: datetime) -> list[uuid.UUID]:
    """The first ``count`` jobs in the provider's line, first first."""
    values = {"line_provider": provider, "now": now, "count": count}
    return list(session.scalars(_line_head(but=False), values))


@functools.cache
def _line_head(but: bool) -> Any:
    """The first ``count`` jobs in a provider's line, but ``but`` when asked, built once
    per shape (parameters: line_provider, now, count, but): every poll of a provider
    with slot limits and every wake runs it."""
    return (
        select(JOBS.c.id)
        .where(
            *in_line(
                JOBS,
                bindparam("line_provider", type_=JOBS.c.provider.type),
                bindparam("now", type_=JOBS.c.created_at.type),
            ),
            *([JOBS.c.id != bindparam("but", type_=JOBS.c.id.type)] if but else []),
        )
        .order_by(*line_order(JOBS))
        .limit(bindparam("count", type_=Integer))
    )


@functools.cache
def _wake_statement(postgres: bool, but: bool) -> Any:
    """wake_waiting's statement, built once per shape: a job's end runs it, and building
    it each time showed in profiles."""
    now = bindparam("now", type_=JOBS.c.created_at.type)
    line = _line_head(but)
    if postgres:
        line = line.with_for_update()
    stale = bindparam("stale", type_=JOBS.c.woken_at.type)
    return (
        update(JOBS)
        .where(
            JOBS.c.id.in_(line.scalar_subquery()),
            or_(JOBS.c.woken_at.is_(None), JOBS.c.woken_at <= stale),
        )
        .values(woken_at=now)
        .returning(JOBS.c.id, JOBS.c.priority, JOBS.c.created_at)
    )


def record_cost(session: Session, job_id: uuid.UUID, cost: float) -> None:
    """What the job cost (the provider's report, or the account's price)."""
    session.execute(update(JOBS).where(JOBS.c.id == job_id).values(cost=cost))


def claimable(job: Job, now: datetime) -> bool:
    """What the claim's conditional UPDATE requires, read from a row (admission asks
    first, so that a job nobody may claim is neither counted nor made to wait)."""
    return (
        job.status == JobStatus.QUEUED.value
        and job.create_started_at is None
        and (job.claimed_until is None or job.claimed_until < now)
        and (job.retry_at is None or job.retry_at <= now + RETRY_TOLERANCE)
    )


def refuse(session: Session, job: Job, code: str, message: str, now: datetime) -> Transition:
    """End a queued job that will not be submitted (a budget under the "fail" policy)."""
    update_ = UpstreamState(JobStatus.FAILED, Source.SUBMIT, error_code=code, error_message=message)
    return apply_update(session, job, update_, now)


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
    create_follows: Sequence[str] = (),
    account: str = DEFAULT_ACCOUNT,
) -> tuple[Job, JobInput | None] | None:
    """Make the caller the job's only submitter, or None (not queued, claimed, or not due).

    The job is bound to ``account`` (the one capacity admitted it on) and stops waiting.

    One conditional UPDATE decides between concurrent workers (the database
    serialises it); the claim expires after ``ttl`` so a worker that dies
    holding it does not strand the job. For a job of a provider named in
    ``create_follows`` (nothing to download before its create call), the claim
    also marks the create as started (see :func:`mark_create_started`): one
    write instead of two.
    """
    values = {
        "job_id": job_id,
        "now": now,
        "due": now + RETRY_TOLERANCE,
        "until": now + timedelta(seconds=ttl),
        "token": token,
        "secret_hash": secret_hash,
        "create_follows": list(create_follows),
        "event_at": now,
        "event_source": Source.SUBMIT.value,
        "event_kind": EventKind.INFO.value,
        "event_to_status": JobStatus.QUEUED.value,
        "account": account,
    }
    row: Any
    if is_postgres(session):
        # One statement: the claim, its event, and the job with its input image.
        row = session.execute(_CLAIM_WITH_EVENT, values).first()
    else:
        row = None
        returned = session.execute(_claim_statement(), values).first()
        if returned is not None:
            attempt = returned.submit_attempts
            message = f"claimed for submission (attempt {attempt})"
            session.execute(
                _INSERT_FIRST_EVENT,
                values
                | {"event_from_status": JobStatus.QUEUED.value, "event_message": message}
                | {"event_payload": None},
            )
            stored = session.execute(
                select(INPUTS.c.content, INPUTS.c.filename, INPUTS.c.content_type).where(
                    INPUTS.c.job_id == job_id
                )
            ).first()
            row = (*returned, *(stored or (None, None, None)))
    if row is None:
        return None
    values = dict(zip([column.key for column in JOBS.c], row, strict=False))
    content, filename, content_type = row[len(JOBS.c) :]
    stored_input = (
        JobInput(job_id=job_id, content=content, filename=filename, content_type=content_type)
        if content is not None
        else None
    )
    return Job(**values), stored_input


def _claim_statement() -> Any:
    """The claim: one conditional UPDATE ... RETURNING (values bound at execution)."""
    now = bindparam("now", type_=JOBS.c.updated_at.type)
    return (
        update(JOBS)
        .where(
            JOBS.c.id == bindparam("job_id"),
            JOBS.c.status == JobStatus.QUEUED.value,
            or_(JOBS.c.claimed_until.is_(None), JOBS.c.claimed_until < now),
            or_(JOBS.c.retry_at.is_(None), JOBS.c.retry_at <= bindparam("due")),
            # A create may have been sent: never again (the sweep settles it).
            JOBS.c.create_started_at.is_(None),
        )
        .values(
            claim_token=bindparam("token"),
            claimed_until=bindparam("until"),
            submit_attempts=JOBS.c.submit_attempts + 1,
            webhook_secret_hash=bindparam("secret_hash"),
            retry_at=None,
            # Bound to the account capacity admitted it on (its polls and cancels use
            # that key); no longer waiting.
            account=bindparam("account"),
            waiting_reason=None,
            create_started_at=case(
                (JOBS.c.provider.in_(bindparam("create_follows", expanding=True)), now),
                else_=null(),
            ),
            updated_at=now,
        )
        .returning(*JOBS.c)
    )


def _claim_with_event() -> Any:
    """PostgreSQL: the claim, its event and the job's input image, in one statement."""
    claimed = _claim_statement().cte("claimed")
    message = (
        literal("claimed for submission (attempt ")
        + cast(claimed.c.submit_attempts, String)
        + literal(")")
    )
    event = {name: _EVENT_VALUES[name] for name in ("at", "source", "kind", "to_status")}
    noted = insert(EVENTS).from_select(
        ["job_id", "from_status", "message", *event],
        select(claimed.c.id, claimed.c.status, message, *event.values()),
    )
    return (
        select(claimed, INPUTS.c.content, INPUTS.c.filename, INPUTS.c.content_type)
        .outerjoin(INPUTS, INPUTS.c.job_id == claimed.c.id)
        .add_cte(noted.cte("noted"))
    )


_CLAIM_WITH_EVENT = _claim_with_event()


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


def claim_lapses_at(job: Job) -> datetime | None:
    """:func:`claim_expiry`, from a row already read."""
    held = (
        job.status == JobStatus.QUEUED.value
        and job.claim_token is not None
        and job.create_started_at is None
    )
    return job.claimed_until if held else None


def claim_expiry(session: Session, job_id: uuid.UUID) -> datetime | None:
    """When another worker's claim on a queued job lapses, if the job can then be claimed
    (None: not queued, not claimed, or a create was sent under the claim)."""
    job = session.get(Job, job_id)
    return claim_lapses_at(job) if job is not None else None


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
    guarded: bool = False,
) -> Job | None:
    """What the create call answered (or how the submission ended), written to the row.

    ``guarded``: in an autocommit session, the row is read without a lock and the
    write guarded (see :func:`accept_webhook`); :class:`RowBusy` if it kept changing.
    """
    now = now or utcnow()
    also = _submission_schedule(plan, poll_url, now)
    if guarded:
        job = read_row(session, job_id)
        if job is not None:
            _apply_guarded(session, job, state, now, also)
        return job
    job = lock_row(session, job_id)
    if job is not None:
        _apply(session, job, state, now, also=also)
    return job


def record_untouched_submission(
    session: Session,
    claimed: Job,
    state: UpstreamState,
    plan: PollPlan,
    *,
    poll_url: str | None = None,
    now: datetime | None = None,
) -> bool:
    """:func:`record_submission` in one statement, from the row as the claim returned it:
    written only while the job is still queued with no task (nothing got there first:
    no webhook, no cancel). False: nothing written, record it the usual way."""
    if claimed.status != JobStatus.QUEUED or claimed.upstream_task_id:
        return False
    now = now or utcnow()
    schedule = _submission_schedule(plan, poll_url, now)
    return _apply(session, claimed, state, now, also=schedule, guarded=True)[1]


def _submission_schedule(plan: PollPlan, poll_url: str | None, now: datetime) -> Also:
    def schedule(result: Transition, ends: bool) -> dict[str, Any]:
        planned: dict[str, Any] = {"poll_url": poll_url} if poll_url else {}
        if result.applied and not ends:
            planned["next_poll_at"] = plan.next_at(PollReason.SUBMITTED, now)
        return planned

    return schedule


# --- webhooks ----------------------------------------------------------------------------


def accept_webhook(
    session: Session,
    job: Job,
    state: UpstreamState,
    plan: PollPlan,
    now: datetime | None = None,
    *,
    guarded: bool = False,
    verify: Callable[[Job], None] | None = None,
) -> Transition:
    """A verified webhook for a job: apply it, and poll only if the next one is late.

    The caller has locked ``job``, or read it without a lock (``guarded``, in an
    autocommit session: :meth:`worker.db.Database.autocommit`): then the write
    happens only if the row still holds what the transition decided from, and
    on a change the row is read again, checked again by ``verify`` (the caller's
    own checks, e.g. the secret: it raises to refuse) and the webhook decided
    anew (:class:`RowBusy` after :data:`GUARDED_ATTEMPTS`). The webhook secret's
    hash is guarded too: a new claim (a new secret) meanwhile is seen.
    ``job`` ends up as written.

    :class:`TaskIdTaken` when it would give the job a task id another job of
    its provider follows: a task belongs to one job (the unique constraint on
    provider and upstream task id), whichever adopted it first. The constraint
    decides, also between two concurrent adoptions; the caller then rolls back.
    """
    now = now or utcnow()
    adopting = bool(state.upstream_task_id) and not job.upstream_task_id and not job.is_terminal
    try:
        if guarded:
            schedule = _webhook_schedule(job, plan, now)
            return _apply_guarded(
                session, job, state, now, schedule, ("webhook_secret_hash",), verify
            )
        return _apply(session, job, state, now, also=_webhook_schedule(job, plan, now))[0]
    except IntegrityError as exc:
        if adopting and _names_task_id(exc):
            raise TaskIdTaken(state.upstream_task_id or "") from exc
        raise


def _apply_guarded(
    session: Session,
    job: Job,
    update: UpstreamState,
    now: datetime,
    also: Also,
    also_guard: Sequence[str] = (),
    verify: Callable[[Job], None] | None = None,
) -> Transition:
    """:func:`_apply` to a row read without a lock: written only if what the transition
    decided from is unchanged; otherwise read again and decided anew. ``job`` ends up
    as written. :class:`RowBusy` after :data:`GUARDED_ATTEMPTS` changes in a row."""
    for _ in range(GUARDED_ATTEMPTS):
        result, written = _apply(
            session, job, update, now, also=also, guarded=True, also_guard=also_guard
        )
        if written:
            return result
        fresh = read_row(session, job.id)
        if fresh is None:
            break  # deleted meanwhile
        for column in JOBS.c:
            set_committed_value(job, column.key, getattr(fresh, column.key))
        if verify is not None:
            verify(job)
    raise RowBusy(job.id)


class RowBusy(VariflowError):
    """A guarded write kept finding the job's row changed by others (try again later)."""

    def __init__(self, job_id: uuid.UUID) -> None:
        super().__init__(f"job {job_id} kept changing under a guarded write")


def _names_task_id(exc: IntegrityError) -> bool:
    """The violation is of the unique (provider, upstream_task_id) constraint."""
    constraint = getattr(getattr(exc.orig, "diag", None), "constraint_name", None)
    return "upstream_task_id" in (constraint or str(exc.orig))


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


def lease_these(
    session: Session, job_ids: Sequence[uuid.UUID], *, lease: timedelta, now: datetime
) -> list[uuid.UUID]:
    """Lease the given jobs for a poll, but those another poll holds (their next poll is
    a lease ahead, beyond RETRY_TOLERANCE): a poll sent for a job's first answer and
    beat's own lease of it never both ask the provider."""
    leased = session.execute(
        update(JOBS)
        .where(
            JOBS.c.id.in_(list(job_ids)),
            JOBS.c.status.in_(ACTIVE),
            JOBS.c.upstream_task_id.is_not(None),
            JOBS.c.next_poll_at <= now + RETRY_TOLERANCE,
        )
        .values(next_poll_at=now + lease)
        .returning(JOBS.c.id)
    )
    return [row.id for row in leased]


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
) -> list[tuple[uuid.UUID, str, str | None, str | None]]:
    """(job id, upstream task id, poll URL, account) of the jobs still in flight among
    ``job_ids`` (a job is polled with its account's key)."""
    return [
        (row.id, row.upstream_task_id, row.poll_url, row.account)
        for row in session.execute(
            select(Job.id, Job.upstream_task_id, Job.poll_url, Job.account).where(
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
    unanswered = []
    for job in jobs:
        state = states.get(job.upstream_task_id or "")
        if state is None:
            unanswered.append(job)
            continue

        def schedule(result: Transition, ends: bool, job: Job = job) -> dict[str, Any]:
            if ends:
                return {}
            attempts = 0 if result.applied else job.poll_attempts + 1
            return {
                "poll_attempts": attempts,
                "next_poll_at": plan.next_at(PollReason.POLLED, now, attempts),
            }

        apply_update(session, job, state, now, record_duplicates=False, also=schedule)
    # Last, so that the unit of work writes them together at commit.
    for job in unanswered:
        job.poll_attempts += 1
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
        # Waiting for capacity is not lost: the queue's head is woken (worker/sweep.py).
        Job.waiting_reason.is_(None),
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


def record_archive(
    session: Session, job_id: uuid.UUID, urls: list[str], message: str
) -> list[str] | None:
    """Where the result images were archived (first writer wins): the URLs kept."""
    job = lock_job(session, job_id)
    if job is None or job.archived_urls:
        return job.archived_urls if job is not None else None
    job.archived_urls = urls
    record_event(session, job, Source.FINALIZE, message)
    return urls


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


def _webhook_schedule(job: Job, plan: PollPlan, now: datetime) -> Also:
    """A webhook's own columns: when it came, and the fallback poll pushed back."""

    def schedule(_result: Transition, ends: bool) -> dict[str, Any]:
        # A late delivery to a finished job changes no column.
        seen = {} if job.is_terminal else {"last_webhook_at": now}
        return seen if ends else seen | {"next_poll_at": plan.next_at(PollReason.WEBHOOK, now)}

    return schedule
