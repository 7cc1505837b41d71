"""What in-process applications import: submit_variation, get_job, cancel_job, wait, list_jobs.

An entry point: the first call reads the settings (once) and installs the
process's runtime with the consumers every variflow process has (finalize,
metrics), unless another entry point (the web app, a Celery worker, the CLI)
installed one already. Input errors are :class:`InvalidInput` (a ValueError)
naming the field; nothing is stored then.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, func, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker import capacity, jobs
from worker import runtime as runtimes
from worker.celery_app import build_runtime, send_submit
from worker.config import get_settings
from worker.db import retry_dropped
from worker.errors import IdempotencyConflict, InvalidInput, JobNotFound
from worker.images import ImageInput, resolve_image
from worker.models import Job, JobEvent, JobInput, utcnow
from worker.outbound import OutboundRefused, UnresolvableHost, check_url
from worker.results import stored_name
from worker.runtime import Runtime
from worker.states import JobStatus
from worker.tokens import check_name
from worker.validation import (
    MAX_NAME_CHARS,
    MAX_PROVIDER_CHARS,
    bad_character,
    describe,
    http_url,
    json_params,
    metadata,
    text,
)

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY = 255  # the String(255) column
MAX_TASK_NAME = MAX_NAME_CHARS  # on_complete_task, a String(255) column
MAX_PAGE_SIZE = 100
MAX_EVENTS = 1000

__all__ = [
    "EventInfo",
    "IdempotencyConflict",
    "JobInfo",
    "JobNotFound",
    "JobPage",
    "Submission",
    "cancel_job",
    "get_job",
    "job_events",
    "list_jobs",
    "list_page",
    "resubmit_job",
    "submit_or_replay",
    "submit_variation",
    "wait",
]


def _runtime() -> Runtime:
    """The process's runtime, installed from the settings on first use."""
    return runtimes.ensure(lambda: build_runtime(get_settings()))


@dataclass(frozen=True)
class EventInfo:
    at: datetime
    source: str
    kind: str
    from_status: str | None
    to_status: str | None
    message: str | None

    @classmethod
    def of(cls, event: JobEvent) -> EventInfo:
        return cls(
            event.at, event.source, event.kind, event.from_status, event.to_status, event.message
        )


@dataclass(frozen=True)
class JobInfo:
    """A read-only snapshot of a job (safe to keep after the session is gone)."""

    id: uuid.UUID
    provider: str
    status: JobStatus
    params: dict[str, Any]
    idempotency_key: str | None
    upstream_task_id: str | None
    result_urls: list[str]
    archived_urls: list[str]
    progress: int
    error_code: str | None
    error_message: str | None
    deadline: datetime
    created_at: datetime
    updated_at: datetime
    submitted_at: datetime | None
    completed_at: datetime | None
    events: tuple[EventInfo, ...] = ()
    tenant: str | None = None
    metadata: dict[str, str] | None = None
    priority: int = 0
    account: str | None = None
    waiting_reason: str | None = None
    cost: float | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    @classmethod
    def from_row(cls, job: Job, events: list[JobEvent] | None = None) -> JobInfo:
        return cls(
            id=job.id,
            provider=job.provider,
            status=JobStatus(job.status),
            params=dict(job.params),
            idempotency_key=job.idempotency_key,
            upstream_task_id=job.upstream_task_id,
            result_urls=list(job.result_urls or []),
            archived_urls=list(job.archived_urls or []),
            progress=job.progress,
            error_code=job.error_code,
            error_message=job.error_message,
            deadline=job.deadline,
            created_at=job.created_at,
            updated_at=job.updated_at,
            submitted_at=job.submitted_at,
            completed_at=job.completed_at,
            tenant=job.tenant,
            metadata=dict(job.job_metadata) if job.job_metadata is not None else None,
            priority=job.priority or 0,
            account=job.account,
            waiting_reason=job.waiting_reason,
            cost=job.cost,
            events=tuple(EventInfo.of(e) for e in events or []),
        )


@dataclass(frozen=True)
class Submission:
    """A job as a submit left it: ``created`` False when an idempotency key replayed it."""

    job: JobInfo
    created: bool


@dataclass(frozen=True)
class JobPage:
    """One page of a listing; ``next_cursor`` continues after its last job (None: the end)."""

    jobs: list[JobInfo]
    next_cursor: str | None


def submit_variation(
    provider: str,
    *,
    image: ImageInput | None = None,
    idempotency_key: str | None = None,
    deadline: datetime | timedelta | float | None = None,
    notify_url: str | None = None,
    on_complete_task: str | None = None,
    tenant: str | None = None,
    metadata: Mapping[str, str] | None = None,
    priority: int = 0,
    runtime: Runtime | None = None,
    **params: Any,
) -> JobInfo:
    """Validate, store a queued job, and (after commit) send it to a worker.

    ``image`` is an http(s) URL, a local file path or bytes; bytes (and files)
    are stored with the job, never put in a broker message. Raises InvalidInput
    (a ValueError) naming the wrong field; nothing is stored then. The same
    ``idempotency_key`` with the same request returns the job it first created;
    with a different request it raises :class:`IdempotencyConflict` (an
    InvalidInput naming that job).

    ``tenant`` names whose job it is (as an API token's tenant does; see
    ``variflow tokens``); idempotency keys are per tenant. ``metadata`` is the
    application's own labels: up to 16 short string keys and values.
    ``priority`` (-100 to 100, default 0) orders the provider's queue when its
    accounts are at capacity: higher first, then oldest.

    When the job ends, variflow sends ``on_complete_task`` (a Celery task name;
    default VARIFLOW_ON_COMPLETE_TASK) with the job id, and POSTs the final
    state to ``notify_url`` signed per Standard Webhooks.
    """
    return submit_or_replay(
        provider,
        image=image,
        idempotency_key=idempotency_key,
        deadline=deadline,
        notify_url=notify_url,
        on_complete_task=on_complete_task,
        tenant=tenant,
        metadata=metadata,
        priority=priority,
        runtime=runtime,
        **params,
    ).job


def submit_or_replay(
    provider: str,
    *,
    image: ImageInput | None = None,
    idempotency_key: str | None = None,
    deadline: datetime | timedelta | float | None = None,
    notify_url: str | None = None,
    on_complete_task: str | None = None,
    tenant: str | None = None,
    metadata: Mapping[str, str] | None = None,
    priority: int = 0,
    runtime: Runtime | None = None,
    **params: Any,
) -> Submission:
    """:func:`submit_variation`, saying whether the job was created or replayed by its key."""
    rt = runtime or _runtime()
    if (
        not isinstance(provider, str)
        or len(provider) > MAX_PROVIDER_CHARS
        or bad_character(provider) is not None
    ):
        raise InvalidInput(
            "provider",
            f"unknown provider {describe(provider)} (known: {', '.join(rt.providers.enabled)})",
        )
    adapter = rt.providers.for_new_job(provider)
    if tenant is not None:
        check_name("tenant", tenant)
    labels = metadata if metadata is None else _metadata(metadata)
    if isinstance(priority, bool) or not isinstance(priority, int) or not -100 <= priority <= 100:
        raise InvalidInput("priority", "a whole number from -100 to 100 (higher goes first)")
    stored_image = None
    if image is not None:
        if "image_url" in params:
            raise InvalidInput("image", "give either image or image_url, not both")
        url, stored_image = resolve_image(image, rt.settings.max_image_bytes)
        if url:
            params["image_url"] = url
    clean = adapter.validate(params, stored_image)
    # Whatever an adapter returns is stored as JSON: every nested string must be storable.
    json_params(clean)
    if idempotency_key is not None:
        if not isinstance(idempotency_key, str) or not idempotency_key:
            raise InvalidInput(
                "idempotency_key", f"a string of 1 to {MAX_IDEMPOTENCY_KEY} characters"
            )
        text("idempotency_key", idempotency_key, max_chars=MAX_IDEMPOTENCY_KEY)
    now = utcnow()
    due = _deadline(deadline, now, rt.settings.default_deadline)
    if notify_url is not None:
        http_url("notify_url", notify_url)  # type, length (the column's 2048), scheme, host
        try:  # a public address, resolved now (worker/outbound.py); sending checks it again
            check_url(notify_url, rt.settings)
        except UnresolvableHost as exc:
            # Not refused now: DNS may be down for a moment, or the name not yet
            # published. Sending resolves it again and gives up, naming the host.
            log.warning("notify_url: %s; it is checked again when the job ends", exc.message)
        except OutboundRefused as exc:
            raise InvalidInput("notify_url", exc.message) from None
    if on_complete_task is not None:
        if not isinstance(on_complete_task, str) or not on_complete_task.strip():
            raise InvalidInput("on_complete_task", "a Celery task name")
        text("on_complete_task", on_complete_task, max_chars=MAX_TASK_NAME)

    fingerprint = request_fingerprint(
        provider,
        clean,
        image=stored_image.content if stored_image is not None else None,
        notify_url=notify_url,
        on_complete_task=on_complete_task,
        metadata=labels,
        priority=priority,
    )
    # No read before the insert: the unique index on (tenant, key) decides, also between
    # concurrent duplicates, and a new key (the common case) costs no extra round trip.
    image_row = (
        jobs.NewInput(stored_image.content, stored_image.filename, stored_image.content_type)
        if stored_image is not None
        else None
    )
    job_id = uuid.uuid4()  # ours before the first try: a second one cannot make a second job

    def create() -> tuple[Job, JobEvent]:
        with rt.autocommit() as session:  # on PostgreSQL, one statement: no BEGIN/COMMIT
            return jobs.create_job(
                session,
                job_id=job_id,
                provider=provider,
                params=clean,
                deadline=due,
                idempotency_key=idempotency_key,
                request_hash=fingerprint,
                tenant=tenant,
                metadata=labels,
                priority=priority,
                notify_url=notify_url,
                on_complete_task=on_complete_task,
                image=image_row,
                now=now,
            )

    try:
        job, accepted = retry_dropped(create)
    except IntegrityError:
        # The first try was written but its answer lost with the connection: it is ours.
        mine = _by_id(rt, job_id)
        if mine is not None:
            send_submit(job_id, provider)
            return Submission(mine, created=True)
        # The idempotency key was used before (or by a concurrent caller): the first wins.
        if idempotency_key is None:
            raise
        existing = _by_idempotency_key(rt, idempotency_key, tenant, fingerprint, provider, clean)
        if existing is None:
            raise
        return Submission(existing, created=False)

    events = [accepted]
    waiting = _join_the_line(rt, job)  # sends the submit message itself when it must
    if waiting is None:
        send_submit(job.id, provider)
    else:
        events.append(waiting)
    # What was just written, as written: no read-back.
    return Submission(JobInfo.from_row(job, events), created=True)


def _join_the_line(rt: Runtime, job: Job) -> JobEvent | None:
    """A job of a provider with capacity limits, behind a line of waiting jobs, waits
    at once and is sent no message: the line's wakes reach it in turn (see
    jobs.wait_in_line). A burst of thousands of jobs then costs the workers nothing
    until slots free. Not under the "fail" budget policy (a job must be asked, so that
    a spent budget fails it at once). Never fatal: the job is written, and its message
    decides."""
    if rt.settings.budget_policy == "fail":
        return None
    if not capacity.limited(rt.providers.accounts(job.provider)):
        return None
    try:
        now = utcnow()
        with rt.autocommit() as session:
            waiting = jobs.wait_in_line(session, job, now)
            if waiting is None:
                return None
            if jobs.still_behind(session, job, now):
                return waiting
        # The jobs ahead went while this one joined: their wakes may have missed it.
        send_submit(job.id, job.provider)
        return waiting
    except Exception as exc:
        log.warning("job %s: could not check its provider's line (%s)", job.id, exc)
        return None


def request_fingerprint(
    provider: str,
    params: Mapping[str, Any],
    *,
    image: bytes | None,
    notify_url: str | None,
    on_complete_task: str | None,
    metadata: Mapping[str, str] | None,
    priority: int = 0,
) -> str:
    """SHA-256 of what a request asked for: two requests with one idempotency key are
    the same request only if these match. The image counts by its digest; the
    deadline does not count (a retry computing "now + 10 minutes" again is still
    the same request, and the first one's deadline holds)."""
    asked = {
        "provider": provider,
        "params": params,
        "image": hashlib.sha256(image).hexdigest() if image is not None else None,
        "notify_url": notify_url,
        "on_complete_task": on_complete_task,
        "metadata": metadata,
        "priority": priority,
    }
    canonical = json.dumps(asked, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def resubmit_job(
    job_id: uuid.UUID | str,
    *,
    tenant: str | None = None,
    idempotency_key: str | None = None,
    runtime: Runtime | None = None,
) -> JobInfo:
    """A new queued job asking what ``job_id`` asked (input, stored image, deadline length,
    notify_url, on-complete task, metadata, tenant). ``tenant``: see :func:`get_job`;
    the same ``idempotency_key`` returns the job it first made (a double click)."""
    rt = runtime or _runtime()
    job_uuid = _as_uuid(job_id)

    def read() -> tuple[Job, JobInput | None] | None:
        with rt.session() as session:
            job = session.scalars(_visible(select(Job), tenant).where(Job.id == job_uuid)).first()
            if job is None:
                return None
            session.expunge(job)
            return job, session.get(JobInput, job_uuid)

    found = retry_dropped(read)
    if found is None:
        raise JobNotFound(job_id)
    old, stored = found
    return submit_variation(
        old.provider,
        image=stored.content if stored is not None else None,
        deadline=old.deadline - old.created_at,
        notify_url=old.notify_url,
        on_complete_task=old.on_complete_task,
        tenant=old.tenant,
        metadata=old.job_metadata,
        priority=old.priority or 0,
        idempotency_key=idempotency_key,
        runtime=rt,
        **old.params,
    )


def get_job(
    job_id: uuid.UUID | str,
    *,
    tenant: str | None = None,
    events: bool = True,
    runtime: Runtime | None = None,
) -> JobInfo:
    """The job, with its events unless ``events`` is False.

    With ``tenant``, a job of another tenant is :class:`JobNotFound`, as if it did
    not exist (the HTTP API passes the token's tenant; None sees every job).
    """
    job_uuid = _as_uuid(job_id)
    found = retry_dropped(lambda: _by_id(runtime or _runtime(), job_uuid, tenant, events))
    if found is None:
        raise JobNotFound(job_id)
    return found


def job_events(
    job_id: uuid.UUID | str, *, tenant: str | None = None, runtime: Runtime | None = None
) -> list[EventInfo]:
    """The job's timeline, oldest first (at most MAX_EVENTS); ``tenant``: see get_job."""
    job_uuid = _as_uuid(job_id)
    rt = runtime or _runtime()

    def read() -> list[EventInfo] | None:
        with rt.autocommit() as session:
            visible = _visible(select(Job.id), tenant).where(Job.id == job_uuid)
            if session.scalar(visible) is None:
                return None
            rows = session.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_uuid)
                .order_by(JobEvent.id)
                .limit(MAX_EVENTS)
            )
            return [EventInfo.of(event) for event in rows]

    found = retry_dropped(read)
    if found is None:
        raise JobNotFound(job_id)
    return found


def job_statuses(
    job_ids: Collection[uuid.UUID], *, runtime: Runtime | None = None
) -> dict[uuid.UUID, str]:
    """The status of each job that exists, in one query (the HTTP API's waiters)."""
    if not job_ids:
        return {}
    with (runtime or _runtime()).autocommit() as session:
        rows = session.execute(select(Job.id, Job.status).where(Job.id.in_(list(job_ids))))
        return {job_id: status for job_id, status in rows}


def list_jobs(
    *,
    statuses: tuple[str, ...] = (),
    provider: str | None = None,
    since: datetime | None = None,
    limit: int = 50,
    runtime: Runtime | None = None,
) -> list[JobInfo]:
    """Jobs, newest first (without their events)."""
    return list_page(
        statuses=statuses, provider=provider, since=since, limit=limit, runtime=runtime
    ).jobs


def list_page(
    *,
    statuses: Iterable[str] = (),
    provider: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    metadata: Mapping[str, str] | None = None,
    tenant: str | None = None,
    cursor: str | None = None,
    limit: int = 20,
    runtime: Runtime | None = None,
) -> JobPage:
    """One page of jobs, newest first (without their events), and the cursor of the next.

    Keyset pagination on (created_at, id): a cursor is a position, so jobs
    created meanwhile never shift a page or appear twice. ``tenant`` limits the
    page to one tenant's jobs (None: every job); ``metadata`` entries must all match.
    """
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInput("limit", f"1 to {MAX_PAGE_SIZE}")
    query = _visible(select(Job), tenant).order_by(Job.created_at.desc(), Job.id.desc())
    wanted = tuple(statuses)
    if wanted:
        query = query.where(Job.status.in_(wanted))
    if provider:
        query = query.where(Job.provider == provider)
    if since:
        query = query.where(Job.created_at >= since)
    if until:
        query = query.where(Job.created_at < until)
    for key, value in (metadata or {}).items():
        query = query.where(Job.job_metadata[key].as_string() == value)
    if cursor is not None:
        after_time, after_id = _decode_cursor(cursor)
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(after_time, after_id))
    with (runtime or _runtime()).autocommit() as session:
        rows = list(session.scalars(query.limit(limit + 1)))
    page = [JobInfo.from_row(job) for job in rows[:limit]]
    more = len(rows) > limit
    return JobPage(page, _encode_cursor(page[-1]) if more else None)


def cancel_job(
    job_id: uuid.UUID | str,
    reason: str = "cancelled by request",
    *,
    tenant: str | None = None,
    runtime: Runtime | None = None,
) -> JobInfo:
    """Cancel a job at once; a task already created upstream is cancelled there on a
    best-effort basis (by a worker, in finalize_job). A terminal job is left as it is.
    ``tenant``: see :func:`get_job`."""
    rt = runtime or _runtime()
    job_uuid = _as_uuid(job_id)
    reason = text("reason", reason, max_chars=MAX_NAME_CHARS)

    def cancel() -> None:  # a transaction: when it fails nothing was written, so again
        with rt.session() as session:
            job = jobs.lock_job(session, job_uuid)
            if job is None or (tenant is not None and job.tenant != tenant):
                raise JobNotFound(job_id)
            jobs.cancel(session, job, reason)

    retry_dropped(cancel)
    return get_job(job_uuid, tenant=tenant, runtime=rt)


@dataclass(frozen=True)
class ResultSource:
    """Where result image ``n`` of a job is: a stored image (its ``name`` among the job's
    images in the result store, worker/result_store.py) or only the provider's URL."""

    job_id: uuid.UUID
    name: str | None
    provider_url: str | None


def result_source(
    job_id: uuid.UUID | str, n: int, *, tenant: str | None = None, runtime: Runtime | None = None
) -> ResultSource:
    """Result ``n`` (0-based) of a completed job; JobNotFound when there is none."""
    job = get_job(job_id, tenant=tenant, events=False, runtime=runtime)
    rt = runtime or _runtime()
    if job.status is not JobStatus.COMPLETED or not 0 <= n < len(job.result_urls):
        raise JobNotFound(f"{job_id}/results/{n}")
    archived = job.archived_urls[n] if n < len(job.archived_urls) else None
    stored = stored_name(rt.settings, job.id, archived)
    upstream = job.result_urls[n]
    return ResultSource(job.id, stored or stored_name(rt.settings, job.id, upstream), upstream)


def wait(
    job_id: uuid.UUID | str,
    timeout: float = 600.0,
    interval: float = 0.25,
    *,
    runtime: Runtime | None = None,
) -> JobInfo:
    """Block until the job is terminal; TimeoutError (carrying the last state) otherwise."""
    rt = runtime or _runtime()
    job_uuid = _as_uuid(job_id)
    deadline = time.monotonic() + timeout
    while True:
        # The status alone while waiting; the whole job (with events) once.
        with rt.session() as session:
            status = session.scalar(select(Job.status).where(Job.id == job_uuid))
        if status is None:
            raise JobNotFound(job_id)
        if JobStatus(status).is_terminal:
            return get_job(job_uuid, runtime=rt)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_uuid} still {status} after {timeout:g}s")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def _visible(query: Select[Any], tenant: str | None) -> Select[Any]:
    return query if tenant is None else query.where(Job.tenant == tenant)


def _by_id(
    rt: Runtime, job_id: uuid.UUID, tenant: str | None = None, events: bool = True
) -> JobInfo | None:
    with rt.autocommit() as session:  # reads only: no BEGIN/COMMIT round trips
        job = session.scalars(_visible(select(Job), tenant).where(Job.id == job_id)).first()
        if job is None:
            return None
        return _snapshot(session, job) if events else JobInfo.from_row(job)


def _same_key(key: str, tenant: str | None) -> ColumnElement[bool]:
    # The unique index's own expression, so the lookup uses it.
    return (func.coalesce(Job.tenant, "") == (tenant or "")) & (Job.idempotency_key == key)


def _by_idempotency_key(
    rt: Runtime,
    key: str,
    tenant: str | None,
    fingerprint: str,
    provider: str,
    params: Mapping[str, Any],
) -> JobInfo | None:
    with rt.autocommit() as session:
        job = session.scalars(select(Job).where(_same_key(key, tenant))).one_or_none()
        if job is None:
            return None
        if job.request_hash is None:  # stored before request hashes (migration 0007)
            same = job.provider == provider and job.params == params
        else:
            same = job.request_hash == fingerprint
        if not same:
            raise IdempotencyConflict(key, job.id)
        return _snapshot(session, job)


def _metadata(value: object) -> dict[str, str]:
    return metadata("metadata", value)


def _encode_cursor(job: JobInfo) -> str:
    position = f"{job.created_at.isoformat()}|{job.id.hex}"
    return base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        at, _, job_id = base64.urlsafe_b64decode(padded.encode("ascii")).decode().partition("|")
        created = datetime.fromisoformat(at)
        if created.utcoffset() is None:
            raise ValueError("naive")
        return created.astimezone(UTC), uuid.UUID(hex=job_id)
    except (ValueError, UnicodeError, binascii.Error):
        raise InvalidInput("cursor", "not a cursor this API gave") from None


def _snapshot(session: Session, job: Job) -> JobInfo:
    events = list(
        session.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id))
    )
    return JobInfo.from_row(job, events)


def _deadline(
    value: datetime | timedelta | float | None, now: datetime, default: float
) -> datetime:
    if value is None:
        return now + timedelta(seconds=default)
    try:
        if isinstance(value, datetime):
            if value.utcoffset() is None:
                raise InvalidInput("deadline", "must be timezone-aware")
            due = value.astimezone(UTC)  # OverflowError near the ends of the calendar
        elif isinstance(value, timedelta):
            due = now + value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            due = now + timedelta(seconds=float(value))
        else:
            raise InvalidInput("deadline", "a datetime, a timedelta or a number of seconds")
    except OverflowError:
        raise InvalidInput("deadline", "out of range") from None
    except InvalidInput:
        raise
    except (TypeError, ValueError):  # NaN, or a tzinfo giving a bad offset
        raise InvalidInput("deadline", "out of range") from None
    if due <= now:
        raise InvalidInput("deadline", "must be in the future")
    return due


def _as_uuid(job_id: uuid.UUID | str) -> uuid.UUID:
    if isinstance(job_id, uuid.UUID):
        return job_id
    try:
        return uuid.UUID(str(job_id))
    except ValueError:
        raise JobNotFound(job_id) from None
