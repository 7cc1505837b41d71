"""The operators' jobs dashboard: server-rendered, read-only, behind HTTP basic auth.

    GET /dashboard                  counts by status, then the jobs, newest first,
                                    50 a page (?page=), filtered by ?status= and ?provider=
    GET /dashboard/jobs/<id>        one job: its fields, input, results, error and timeline
    GET /dashboard/jobs/<id>/input  the input image stored with the job (job_inputs)

Credentials come from VARIFLOW_DASHBOARD_USER and VARIFLOW_DASHBOARD_PASSWORD.
Unless both are set, every dashboard URL answers 404, as if there were no
dashboard: it is never open by default.

Templates get plain view objects built here, never ORM rows, so secrets
(``webhook_secret_hash``, ``claim_token``) and image bytes cannot reach a page
by accident; Jinja autoescapes everything else.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, abort, render_template, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import Select, func, select, union_all
from sqlalchemy.orm import Session

from webhooks.context import runtime
from worker.api import EventInfo
from worker.config import Settings
from worker.models import Job, JobEvent, JobInput, utcnow
from worker.states import JobStatus

bp = Blueprint("dashboard", __name__, url_prefix="/dashboard", template_folder="templates")

REALM = "variflow dashboard"
PAGE_SIZE = 50
MAX_PAGE = 1000  # deep OFFSETs cost; 50,000 jobs back is far enough for a dashboard
MAX_EVENTS = 1000
MAX_VALUE_CHARS = 300
# A page shows this many result thumbnails (and links) at most, whatever a row holds.
MAX_THUMBNAILS = 16
STATUSES = tuple(s.value for s in JobStatus)
# Input images are served with their own type only when it is one of these.
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp"})
CSP = (
    "default-src 'none'; img-src 'self' http: https:; style-src 'unsafe-inline'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


# --- access ------------------------------------------------------------------


def _digest(value: str) -> bytes:
    # Hashing first makes the comparison independent of the lengths, too.
    return hashlib.sha256(value.encode("utf-8")).digest()


def credentials_match(user: str, password: str, settings: Settings) -> bool:
    assert settings.dashboard_user is not None and settings.dashboard_password is not None
    user_ok = hmac.compare_digest(_digest(user), _digest(settings.dashboard_user))
    password_ok = hmac.compare_digest(
        _digest(password), _digest(settings.dashboard_password.get_secret_value())
    )
    return user_ok and password_ok  # both compared, whatever the first answered


def dashboard_enabled(settings: Settings) -> bool:
    return bool(
        settings.dashboard_user
        and settings.dashboard_password
        and settings.dashboard_password.get_secret_value()
    )


@bp.before_request
def _require_credentials() -> ResponseReturnValue | None:
    settings = runtime().settings
    if not dashboard_enabled(settings):
        abort(404)
    auth = request.authorization
    if (
        auth is None
        or auth.type != "basic"
        or not credentials_match(auth.username or "", auth.password or "", settings)
    ):
        response = Response("authentication required\n", 401, mimetype="text/plain")
        response.headers["WWW-Authenticate"] = f'Basic realm="{REALM}", charset="UTF-8"'
        return response
    return None


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"  # hotlinked results see no job URLs
    response.headers["X-Frame-Options"] = "DENY"
    return response


# --- what the templates see --------------------------------------------------


@dataclass(frozen=True)
class JobRow:
    id: uuid.UUID
    provider: str
    status: str
    progress: int
    prompt: str | None
    error_code: str | None
    created_at: datetime
    updated_at: datetime


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

    @property
    def is_terminal(self) -> bool:
        return JobStatus(self.status).is_terminal

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
    jobs = [
        JobRow(
            id=row.id,
            provider=row.provider,
            status=row.status,
            progress=row.progress,
            prompt=_short(row.params.get("prompt")) if isinstance(row.params, dict) else None,
            error_code=row.error_code,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
        for row in rows[:PAGE_SIZE]
    ]
    return jobs, len(rows) > PAGE_SIZE


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
    )


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


# --- views -------------------------------------------------------------------


def _choice(name: str, allowed: tuple[str, ...]) -> str | None:
    value = request.args.get(name, "").strip()
    if not value:
        return None
    if value not in allowed:
        abort(400, description=f"{name}: one of {', '.join(allowed)}")
    return value


def index_url(**args: Any) -> str:
    """The jobs list with the given query arguments, leaving out empty ones."""
    values: dict[str, Any] = {k: v for k, v in args.items() if v not in (None, "")}
    return url_for("dashboard.index", **values)


@bp.get("")
@bp.get("/")
def index() -> ResponseReturnValue:
    status = _choice("status", STATUSES)
    providers = runtime().providers.names()
    provider = _choice("provider", providers)
    page = min(max(request.args.get("page", 1, type=int) or 1, 1), MAX_PAGE)
    with runtime().session() as session:
        counts = status_counts(session, provider)
        jobs, has_next = job_rows(session, status, provider, page)
    total = counts[status] if status else sum(counts.values())
    return render_template(
        "dashboard_index.html",
        counts=counts,
        total=total,
        jobs=jobs,
        status=status,
        provider=provider,
        statuses=STATUSES,
        providers=providers,
        page=page,
        first=(page - 1) * PAGE_SIZE + 1,
        prev_url=index_url(status=status, provider=provider, page=page - 1) if page > 1 else None,
        next_url=index_url(status=status, provider=provider, page=page + 1)
        if has_next and page < MAX_PAGE
        else None,
        index_url=index_url,
        now=utcnow(),
    )


@bp.get("/jobs/<uuid:job_id>")
def job_detail(job_id: uuid.UUID) -> ResponseReturnValue:
    settings = runtime().settings
    with runtime().session() as session:
        job = load_job_page(session, job_id, settings)
    if job is None:
        abort(404)
    return render_template("dashboard_job.html", job=job, index_url=index_url, now=utcnow())


@bp.get("/jobs/<uuid:job_id>/input")
def job_input(job_id: uuid.UUID) -> ResponseReturnValue:
    with runtime().session() as session:
        stored = session.execute(
            select(JobInput.content, JobInput.content_type).where(JobInput.job_id == job_id)
        ).one_or_none()
    if stored is None:
        abort(404)
    content, kind = stored
    if kind in IMAGE_TYPES:
        response = Response(bytes(content), mimetype=kind)
    else:  # never let a browser render bytes of unknown type from this origin
        response = Response(bytes(content), mimetype="application/octet-stream")
        response.headers["Content-Disposition"] = "attachment"
    response.headers["Cache-Control"] = "private, max-age=3600"  # a job's input never changes
    return response


# --- template helpers --------------------------------------------------------


@bp.app_template_filter("dashboard_time")
def format_time(value: datetime | None, precise: bool = False) -> str:
    if value is None:
        return "—"
    text = value.strftime("%Y-%m-%d %H:%M:%S")
    return f"{text}.{value.microsecond // 1000:03d}" if precise else text


@bp.app_template_filter("dashboard_ago")
def format_ago(value: datetime | None, now: datetime) -> str:
    if value is None:
        return ""
    return format_duration(now - value, suffix=" ago")


@bp.app_template_filter("dashboard_duration")
def format_duration(value: timedelta | None, suffix: str = "") -> str:
    if value is None:
        return "—"
    seconds = value.total_seconds()
    if seconds < 0:
        return "in " + format_duration(-value)
    if seconds < 60:
        return f"{seconds:.1f} s{suffix}"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min{suffix}"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h{suffix}"
    return f"{seconds / 86400:.0f} d{suffix}"
