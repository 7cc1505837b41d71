"""What in-process applications import: submit_variation, get_job, cancel_job, wait, list_jobs.

An entry point: the first call reads the settings (once) and installs the
process's runtime with the consumers every variflow process has (finalize,
metrics), unless another entry point (the web app, a Celery worker, the CLI)
installed one already. Input errors are :class:`InvalidInput` (a ValueError)
naming the field; nothing is stored then.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker import jobs
from worker import runtime as runtimes
from worker.celery_app import build_runtime, send_submit
from worker.config import get_settings
from worker.db import retry_dropped
from worker.errors import InvalidInput, JobNotFound
from worker.images import ImageInput, resolve_image
from worker.models import Job, JobEvent, utcnow
from worker.outbound import OutboundRefused, UnresolvableHost, check_url
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
    text,
)

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY = 255  # the String(255) column
MAX_TASK_NAME = MAX_NAME_CHARS  # on_complete_task, a String(255) column

__all__ = [
    "EventInfo",
    "JobInfo",
    "JobNotFound",
    "cancel_job",
    "get_job",
    "list_jobs",
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
            events=tuple(
                EventInfo(e.at, e.source, e.kind, e.from_status, e.to_status, e.message)
                for e in events or []
            ),
        )


def submit_variation(
    provider: str,
    *,
    image: ImageInput | None = None,
    idempotency_key: str | None = None,
    deadline: datetime | timedelta | float | None = None,
    notify_url: str | None = None,
    on_complete_task: str | None = None,
    tenant: str | None = None,
    runtime: Runtime | None = None,
    **params: Any,
) -> JobInfo:
    """Validate, store a queued job, and (after commit) send it to a worker.

    ``image`` is an http(s) URL, a local file path or bytes; bytes (and files)
    are stored with the job, never put in a broker message. Raises InvalidInput
    (a ValueError) naming the wrong field; nothing is stored then. The same
    ``idempotency_key`` returns the job it first created.

    ``tenant`` names whose job it is (as an API token's tenant does; see
    ``variflow tokens``); the same idempotency key with another tenant is refused.

    When the job ends, variflow sends ``on_complete_task`` (a Celery task name;
    default VARIFLOW_ON_COMPLETE_TASK) with the job id, and POSTs the final
    state to ``notify_url`` signed per Standard Webhooks.
    """
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

    if idempotency_key is not None:
        existing = _by_idempotency_key(rt, idempotency_key, provider, clean, tenant)
        if existing is not None:
            return existing
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
                tenant=tenant,
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
            return mine
        # Another caller inserted the same idempotency key first: theirs wins.
        if idempotency_key is None:
            raise
        existing = _by_idempotency_key(rt, idempotency_key, provider, clean, tenant)
        if existing is None:
            raise
        return existing

    send_submit(job.id, provider)
    # What was just written, as written: no read-back.
    return JobInfo.from_row(job, [accepted])


def get_job(job_id: uuid.UUID | str, *, runtime: Runtime | None = None) -> JobInfo:
    job_uuid = _as_uuid(job_id)
    found = retry_dropped(lambda: _by_id(runtime or _runtime(), job_uuid))
    if found is None:
        raise JobNotFound(job_id)
    return found


def list_jobs(
    *,
    statuses: tuple[str, ...] = (),
    provider: str | None = None,
    since: datetime | None = None,
    limit: int = 50,
    runtime: Runtime | None = None,
) -> list[JobInfo]:
    """Jobs, newest first (without their events)."""
    query = select(Job).order_by(Job.created_at.desc()).limit(limit)
    if statuses:
        query = query.where(Job.status.in_(statuses))
    if provider:
        query = query.where(Job.provider == provider)
    if since:
        query = query.where(Job.created_at >= since)
    with (runtime or _runtime()).session() as session:
        return [JobInfo.from_row(job) for job in session.scalars(query)]


def cancel_job(
    job_id: uuid.UUID | str,
    reason: str = "cancelled by request",
    *,
    runtime: Runtime | None = None,
) -> JobInfo:
    """Cancel a job at once; a task already created upstream is cancelled there on a
    best-effort basis (by a worker, in finalize_job). A terminal job is left as it is."""
    rt = runtime or _runtime()
    job_uuid = _as_uuid(job_id)

    def cancel() -> None:  # a transaction: when it fails nothing was written, so again
        with rt.session() as session:
            job = jobs.lock_job(session, job_uuid)
            if job is None:
                raise JobNotFound(job_id)
            jobs.cancel(session, job, reason)

    retry_dropped(cancel)
    return get_job(job_uuid, runtime=rt)


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


def _by_id(rt: Runtime, job_id: uuid.UUID) -> JobInfo | None:
    with rt.session() as session:
        job = session.get(Job, job_id)
        return _snapshot(session, job) if job is not None else None


def _by_idempotency_key(
    rt: Runtime, key: str, provider: str, params: dict[str, Any], tenant: str | None
) -> JobInfo | None:
    with rt.session() as session:
        job = session.scalars(select(Job).where(Job.idempotency_key == key)).one_or_none()
        if job is None:
            return None
        if job.provider != provider or job.params != params or job.tenant != tenant:
            raise InvalidInput(
                "idempotency_key",
                f"{key!r} was already used for a different request (job {job.id})",
            )
        return _snapshot(session, job)


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
