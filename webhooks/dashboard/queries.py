"""What the dashboard reads: plain view objects built from the jobs table.

Templates get these, never ORM rows, so secrets (``webhook_secret_hash``,
``claim_token``) and image bytes cannot reach a page by accident. The
dashboard only reads rows here; every change goes through worker.api.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import ColumnElement, Select, func, or_, select, union_all
from sqlalchemy.orm import Session

from worker import capacity
from worker.accounts import Account
from worker.api import EventInfo
from worker.config import Settings
from worker.job_stats import WAIT_REASONS, query_waiting
from worker.models import Job, JobEvent, JobInput
from worker.states import JobStatus
from worker.validation import bad_character

PAGE_SIZE = 50
MAX_PAGE = 1000  # deep OFFSETs cost; 50,000 jobs back is far enough for a dashboard
MAX_EVENTS = 1000
MAX_VALUE_CHARS = 300
# A page shows this many result thumbnails (and links) at most, whatever a row holds.
MAX_THUMBNAILS = 16
STATUSES = tuple(s.value for s in JobStatus)
# Input images are served with their own type only when it is one of these.
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp"})
# The longest search worth running: an idempotency key is a String(255).
MAX_QUERY_CHARS = 255
# Fewer hex digits than this would match a sixteenth of all jobs or more.
MIN_PREFIX_DIGITS = 4
_HEX = re.compile(r"[0-9a-f]+")


# --- what the templates see --------------------------------------------------


@dataclass(frozen=True)
class JobRow:
    id: uuid.UUID
    provider: str
    tenant: str | None
    status: str
    progress: int
    prompt: str | None
    error_code: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def in_flight(self) -> bool:
        return not JobStatus(self.status).is_terminal


@dataclass(frozen=True)
class Param:
    name: str
    text: str
    link: str | None  # an http(s) URL: shown as a link, never loaded by the page


@dataclass(frozen=True)
class Image:
    src: str
    label: str


@dataclass(frozen=True)
class InputInfo:
    filename: str
    content_type: str
    size: int

    @property
    def is_image(self) -> bool:
        return self.content_type in IMAGE_TYPES


@dataclass(frozen=True)
class JobPage:
    id: uuid.UUID
    provider: str
    tenant: str | None
    status: str
    progress: int
    upstream_task_id: str | None
    idempotency_key: str | None
    error_code: str | None
    error_message: str | None
    submit_attempts: int
    poll_attempts: int
    deadline: datetime
    created_at: datetime
    updated_at: datetime
    submitted_at: datetime | None
    completed_at: datetime | None
    next_poll_at: datetime | None
    last_webhook_at: datetime | None
    notify_host: str | None
    notified_at: datetime | None
    on_complete_task: str | None
    params: tuple[Param, ...]
    input: InputInfo | None
    results: tuple[Image, ...]
    more_results: int  # result images not shown (over MAX_THUMBNAILS)
    archived: bool
    provider_urls: tuple[str, ...]
    events: tuple[EventInfo, ...]
    more_events: bool
    # Provider capacity (worker/capacity.py): the account the job is bound to, its
    # place in the queue, what it cost, and why a queued job waits.
    account: str | None
    priority: int
    cost: float | None
    waiting_reason: str | None

    @property
    def is_terminal(self) -> bool:
        return JobStatus(self.status).is_terminal

    @property
    def waiting(self) -> str | None:
        """Why the job waits for capacity: only while it is queued."""
        return self.waiting_reason if self.status == JobStatus.QUEUED.value else None

    @property
    def duration(self) -> timedelta | None:
        return self.completed_at - self.created_at if self.completed_at else None


# --- queries -----------------------------------------------------------------


def status_counts(session: Session, provider: str | None) -> dict[str, int]:
    """Jobs per status, in one grouped query; every status is present."""
    query = select(Job.status, func.count()).group_by(Job.status)
    if provider:
        query = query.where(Job.provider == provider)
    counts = dict.fromkeys(STATUSES, 0)
    for status, count in session.execute(query):
        counts[status] = int(count)
    return counts


_ROW_COLUMNS = (
    Job.id,
    Job.provider,
    Job.tenant,
    Job.status,
    Job.progress,
    Job.params,
    Job.error_code,
    Job.created_at,
    Job.updated_at,
)


def job_rows(
    session: Session, status: str | None, provider: str | None, page: int
) -> tuple[list[JobRow], bool]:
    """One page of jobs, newest first, and whether an older page exists.

    The only index that orders jobs by time is (status, created_at), so each
    status is read newest first on its own, cut at the page's end, and the
    parts are merged: every page costs index range scans whatever the size of
    the table, instead of a sort of all of it.
    """
    offset = (page - 1) * PAGE_SIZE
    wanted = offset + PAGE_SIZE + 1  # one more tells whether there is a next page
    parts: list[Select[Any]] = []
    for each in (status,) if status else STATUSES:
        query = select(*_ROW_COLUMNS).where(Job.status == each)
        if provider:
            query = query.where(Job.provider == provider)
        newest = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(wanted).subquery()
        parts.append(select(*newest.c))  # wrapped: SQLite refuses ORDER BY inside UNION
    merged = union_all(*parts).subquery()
    rows = session.execute(
        select(*merged.c)
        .order_by(merged.c.created_at.desc(), merged.c.id.desc())
        .offset(offset)
        .limit(PAGE_SIZE + 1)
    ).all()
    return [_job_row(row) for row in rows[:PAGE_SIZE]], len(rows) > PAGE_SIZE


def _job_row(row: Any) -> JobRow:
    return JobRow(
        id=row.id,
        provider=row.provider,
        tenant=row.tenant,
        status=row.status,
        progress=row.progress,
        prompt=_short(row.params.get("prompt")) if isinstance(row.params, dict) else None,
        error_code=row.error_code,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def id_range(query: str) -> tuple[uuid.UUID, uuid.UUID] | None:
    """The ids starting with the hex digits of ``query`` (hyphens ignored), as a range.

    A range of uuid values rather than a LIKE on text: the ids are a native
    uuid on PostgreSQL and CHAR(32) hex on SQLite, which order alike (byte
    order is hex order), so one BETWEEN matches the same jobs on both, and
    uses the primary key's index on both. None: not a prefix (too short, or
    not hex).
    """
    digits = query.replace("-", "").lower()
    if not MIN_PREFIX_DIGITS <= len(digits) <= 32 or not _HEX.fullmatch(digits):
        return None
    return uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f"))


def search(session: Session, query: str, limit: int = PAGE_SIZE) -> tuple[list[JobRow], bool]:
    """Jobs whose id is ``query``, whose id starts with it, or whose idempotency key
    is exactly it, newest first; and whether more than ``limit`` matched."""
    matches: list[ColumnElement[bool]] = []
    try:
        matches.append(Job.id == uuid.UUID(query))  # also {…} and urn:uuid: forms
    except ValueError:
        prefix = id_range(query)
        if prefix is not None:
            matches.append(Job.id.between(*prefix))
    # A key with a NUL could never have been stored, and PostgreSQL refuses to compare it.
    if bad_character(query) is None:
        matches.append(Job.idempotency_key == query)
    if not matches:
        return [], False
    rows = session.execute(
        select(*_ROW_COLUMNS)
        .where(or_(*matches))
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit + 1)
    ).all()
    return [_job_row(row) for row in rows[:limit]], len(rows) > limit


def job_status(session: Session, job_id: uuid.UUID) -> JobStatus | None:
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    return JobStatus(status) if status is not None else None


def load_job_page(session: Session, job_id: uuid.UUID, settings: Settings) -> JobPage | None:
    job = session.get(Job, job_id)
    if job is None:
        return None
    events = session.execute(
        select(
            JobEvent.at,
            JobEvent.source,
            JobEvent.kind,
            JobEvent.from_status,
            JobEvent.to_status,
            JobEvent.message,
        )
        .where(JobEvent.job_id == job_id)
        .order_by(JobEvent.id)
        .limit(MAX_EVENTS + 1)
    ).all()
    stored = session.execute(
        select(JobInput.filename, JobInput.content_type, func.length(JobInput.content)).where(
            JobInput.job_id == job_id
        )
    ).one_or_none()
    provider_urls = tuple(job.result_urls or [])
    shown = job.archived_urls or provider_urls
    results = tuple(
        Image(src, f"result {n}")
        for n, src in enumerate((_image_src(url, settings) for url in shown), 1)
        if src is not None
    )
    more_results = max(0, len(results) - MAX_THUMBNAILS)
    results = results[:MAX_THUMBNAILS]
    return JobPage(
        id=job.id,
        provider=job.provider,
        tenant=job.tenant,
        status=job.status,
        progress=job.progress,
        upstream_task_id=job.upstream_task_id,
        idempotency_key=job.idempotency_key,
        error_code=job.error_code,
        error_message=job.error_message,
        submit_attempts=job.submit_attempts,
        poll_attempts=job.poll_attempts,
        deadline=job.deadline,
        created_at=job.created_at,
        updated_at=job.updated_at,
        submitted_at=job.submitted_at,
        completed_at=job.completed_at,
        next_poll_at=job.next_poll_at,
        last_webhook_at=job.last_webhook_at,
        # A notify URL may carry a token in its path or query: only its host is shown.
        notify_host=urlsplit(job.notify_url).netloc if job.notify_url else None,
        notified_at=job.notified_at,
        on_complete_task=job.on_complete_task,
        params=tuple(_param(name, value) for name, value in sorted(job.params.items())),
        input=InputInfo(stored[0], stored[1], int(stored[2] or 0)) if stored else None,
        results=results,
        more_results=more_results,
        archived=bool(job.archived_urls),
        provider_urls=tuple(url for url in provider_urls if _is_http(url))[:MAX_THUMBNAILS],
        events=tuple(EventInfo(*event) for event in events[:MAX_EVENTS]),
        more_events=len(events) > MAX_EVENTS,
        account=job.account,
        priority=job.priority,
        cost=job.cost,
        waiting_reason=job.waiting_reason,
    )


# --- accounts ------------------------------------------------------------------


@dataclass(frozen=True)
class AccountRow:
    """One provider account as the accounts page shows it: its key only as a fingerprint."""

    provider: str
    name: str
    fingerprint: str
    in_flight: int
    max_in_flight: int | None
    jobs_today: int
    daily_jobs: int | None
    failed_today: int
    daily_failed: int | None
    spend_today: float
    daily_spend_cap: float | None
    paused_until: datetime | None
    pause_reason: str | None
    breaker: str  # "closed", "open" or "half-open"
    opened_until: datetime | None
    failures: int
    waiting: int  # the provider's jobs waiting for capacity (shared by its accounts)

    @property
    def label(self) -> str:
        return f"{self.provider}/{self.name}"

    @property
    def busy(self) -> bool:
        """Something may change soon: the page refreshes itself while any row is busy."""
        return bool(self.in_flight or self.waiting or self.paused_until or self.breaker != "closed")


@dataclass(frozen=True)
class ProviderWaiting:
    provider: str
    total: int
    by_reason: tuple[tuple[str, int], ...]  # the kinds with jobs, in WAIT_REASONS order


def account_rows(
    session: Session, accounts: tuple[Account, ...], now: datetime, breaker_threshold: int
) -> list[AccountRow]:
    return [
        AccountRow(
            provider=status.account.provider,
            name=status.account.name,
            fingerprint=status.account.fingerprint,
            in_flight=status.usage.in_flight,
            max_in_flight=status.account.limits.max_in_flight,
            jobs_today=status.usage.jobs_today,
            daily_jobs=status.account.limits.daily_jobs,
            failed_today=status.usage.failed_today,
            daily_failed=status.account.limits.daily_failed,
            spend_today=status.spend_today,
            daily_spend_cap=status.account.limits.daily_spend_cap,
            paused_until=status.paused_until,
            # The reason of a pause that is over is history, not state.
            pause_reason=status.pause_reason if status.paused_until is not None else None,
            breaker=status.breaker,
            opened_until=status.opened_until if status.breaker != "closed" else None,
            failures=status.failures,
            waiting=status.waiting,
        )
        for status in capacity.snapshot(session, accounts, now, breaker_threshold)
    ]


def waiting_by_provider(session: Session, providers: tuple[str, ...]) -> list[ProviderWaiting]:
    """Every provider's jobs waiting for capacity, by kind of reason (worker/job_stats.py)."""
    counts = query_waiting(session)
    found = []
    for provider in dict.fromkeys([*providers, *(p for p, _ in counts)]):
        by_reason = tuple(
            (reason, counts[(provider, reason)])
            for reason in WAIT_REASONS
            if counts.get((provider, reason))
        )
        found.append(ProviderWaiting(provider, sum(n for _, n in by_reason), by_reason))
    return found


def _is_http(url: str) -> bool:
    return urlsplit(url).scheme in ("http", "https")


def _image_src(url: str, settings: Settings) -> str | None:
    """Where a page loads a result image from; None for anything but http(s)."""
    own = f"{settings.public_base}/results/"
    if url.startswith(own):
        # Served by this app: a path, so it loads whichever address the dashboard is on.
        return url[len(settings.public_base) :]
    return url if _is_http(url) else None


def _short(value: object, limit: int = 80) -> str | None:
    if not isinstance(value, str):
        return None
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _param(name: str, value: object) -> Param:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    link = value if isinstance(value, str) and _is_http(value) else None
    if len(text) > MAX_VALUE_CHARS:
        text = f"{text[:MAX_VALUE_CHARS]}… ({len(text)} characters)"
    return Param(name, text, link)
