"""The dashboard's routes, the headers of its pages, and its template filters."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, abort, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from markupsafe import Markup
from sqlalchemy import select

from webhooks.context import runtime
from webhooks.dashboard import access
from webhooks.dashboard.charts import duration_chart, error_chart, jobs_chart, seconds_text
from webhooks.dashboard.overview import DEFAULT_WINDOW, WINDOWS, load_overview
from webhooks.dashboard.queries import (
    IMAGE_TYPES,
    MAX_PAGE,
    MAX_QUERY_CHARS,
    PAGE_SIZE,
    STATUSES,
    JobPage,
    account_rows,
    job_rows,
    job_status,
    load_job_page,
    search,
    status_counts,
    waiting_by_provider,
)
from webhooks.metrics import all_accounts
from worker.api import cancel_job, resubmit_job
from worker.errors import InvalidInput, JobNotFound
from worker.models import JobInput, utcnow
from worker.states import JobStatus

# The templates are the app's (webhooks/templates), named dashboard_*.html.
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
bp = Blueprint("dashboard", __name__, url_prefix="/dashboard", template_folder=TEMPLATES)

# How often a list with jobs in flight fetches itself again.
REFRESH_SECONDS = 5
# How often the overview fetches itself again: its smallest bucket is a minute.
OVERVIEW_REFRESH_SECONDS = 30
# The list's only script. It fetches the page it is on and swaps in the fresh
# [data-live] regions: the forms are left alone, so a search being typed is not
# lost, and the scroll position stays. It stops once the fresh page has no
# [data-refresh] (nothing in flight), on a redirect, or on a 4xx (e.g. 401
# after a password change); a 5xx or a network error is tried again later.
LIVE_SCRIPT = """
(function () {
  "use strict";
  function live() { return document.querySelector("[data-refresh]"); }
  function later() {
    var region = live();
    if (region) setTimeout(refresh, 1000 * (Number(region.dataset.refresh) || 5));
  }
  function refresh() {
    if (document.hidden) { later(); return; }
    fetch(location.href, {cache: "no-store", credentials: "same-origin"})
      .then(function (response) {
        if (response.redirected || (!response.ok && response.status < 500)) return;
        if (!response.ok) { later(); return; }
        return response.text().then(function (html) {
          var page = new DOMParser().parseFromString(html, "text/html");
          document.querySelectorAll("[data-live]").forEach(function (region) {
            var fresh = page.getElementById(region.id);
            if (fresh) region.replaceWith(document.adoptNode(fresh));
          });
          later();
        });
      })
      .catch(later);
  }
  later();
})();
"""
# Allowed by its hash rather than a nonce: the policy then names this one
# script, whatever a page holds, and stays the same on every response.
_LIVE_HASH = base64.b64encode(hashlib.sha256(LIVE_SCRIPT.encode()).digest()).decode()
CSP = (
    "default-src 'none'; img-src 'self' http: https:; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{_LIVE_HASH}'; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
# A cancel names the operator in the job's error message (at most 255 characters).
MAX_USER_IN_REASON = 64


# --- access ------------------------------------------------------------------


@bp.before_request
def _require_credentials() -> ResponseReturnValue | None:
    settings = runtime().settings
    if not access.dashboard_enabled(settings):
        abort(404)
    auth = request.authorization
    if (
        auth is None
        or auth.type != "basic"
        or not access.credentials_match(auth.username or "", auth.password or "", settings)
    ):
        response = Response("authentication required\n", 401, mimetype="text/plain")
        response.headers["WWW-Authenticate"] = f'Basic realm="{access.REALM}", charset="UTF-8"'
        return response
    return None


@bp.before_request
def _protect_writes() -> None:
    """Every request that may change something must come from one of our own forms
    (runs after _require_credentials: blueprint hooks run in the order registered)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    settings = runtime().settings
    problem = access.cross_origin(
        request.headers.get("Sec-Fetch-Site"),
        request.headers.get("Origin"),
        access.own_hosts(request.host, settings),
    )
    if problem:
        abort(403, description=f"Refused: {problem}. Use the dashboard's own pages.")
    token = request.form.get("csrf_token", "")
    if not access.token_valid(settings, _user(), token, time.time()):
        abort(
            400,
            description="The form's CSRF token is missing, invalid or expired: "
            "reload the page and try again.",
        )


def _user() -> str:
    auth = request.authorization
    assert auth is not None and auth.username is not None  # _require_credentials ran
    return auth.username


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    # Hotlinked results see no job URLs; the dashboard's own requests keep their
    # Origin, which the CSRF check reads (access.py).
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Frame-Options"] = "DENY"
    return response


# --- reading -------------------------------------------------------------------


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
    query = request.args.get("q", "").strip()
    if len(query) > MAX_QUERY_CHARS:
        abort(400, description=f"q: at most {MAX_QUERY_CHARS} characters")
    if query:
        return _search(query)
    status = _choice("status", STATUSES)
    providers = runtime().providers.names()
    provider = _choice("provider", providers)
    page = min(max(request.args.get("page", 1, type=int) or 1, 1), MAX_PAGE)
    with runtime().session() as session:
        counts = status_counts(session, provider)
        jobs, has_next = job_rows(session, status, provider, page)
    total = counts[status] if status else sum(counts.values())
    return _list_page(
        counts=counts,
        total=total,
        jobs=jobs,
        status=status,
        provider=provider,
        providers=providers,
        page=page,
        first=(page - 1) * PAGE_SIZE + 1,
        prev_url=index_url(status=status, provider=provider, page=page - 1) if page > 1 else None,
        next_url=index_url(status=status, provider=provider, page=page + 1)
        if has_next and page < MAX_PAGE
        else None,
    )


def _search(query: str) -> ResponseReturnValue:
    """The search box: one job found is its page; several are the list, filtered."""
    with runtime().session() as session:
        jobs, more = search(session, query)
        if len(jobs) == 1 and not more:
            return redirect(url_for("dashboard.job_detail", job_id=jobs[0].id))
        counts = status_counts(session, None)
    return _list_page(
        counts=counts,
        total=len(jobs),
        jobs=jobs,
        query=query,
        more_matches=more,
        providers=runtime().providers.names(),
    )


def _list_page(**values: Any) -> str:
    jobs = values["jobs"]
    defaults: dict[str, Any] = {
        "status": None,
        "provider": None,
        "query": "",
        "more_matches": False,
        "page": 1,
        "first": 1,
        "prev_url": None,
        "next_url": None,
    }
    return render_template(
        "dashboard_index.html",
        **(defaults | values),
        statuses=STATUSES,
        # Only while a job shown may still change: a finished list stays still.
        refresh=REFRESH_SECONDS if any(job.in_flight for job in jobs) else None,
        live_script=Markup(LIVE_SCRIPT),  # noqa: S704 - our constant, allowed by its hash
        index_url=index_url,
        now=utcnow(),
    )


@bp.get("/accounts")
def accounts() -> ResponseReturnValue:
    """Every provider account's capacity now, and the jobs waiting for it."""
    rt = runtime()
    now = utcnow()
    with rt.session() as session:
        rows = account_rows(session, all_accounts(rt), now, rt.settings.breaker_threshold)
        waiting = waiting_by_provider(session, rt.settings.provider_names)
    # The list's live script, unchanged (so the policy's hash still allows it): it
    # refreshes the [data-live] regions while anything may change.
    refresh = REFRESH_SECONDS if any(row.busy for row in rows) else None
    return render_template(
        "dashboard_accounts.html",
        accounts=rows,
        waiting=waiting,
        providers=rt.providers.names(),  # the jobs list filters by these
        refresh=refresh,
        live_script=Markup(LIVE_SCRIPT),  # noqa: S704 - our constant, allowed by its hash
        index_url=index_url,
        now=now,
    )


@bp.get("/overview")
def overview() -> ResponseReturnValue:
    """Jobs of the last hour (or ?window=day) per minute (or 15 minutes) by how they
    ended, their time to completion, and the failed ones' error codes; ?provider= one."""
    rt = runtime()
    window = WINDOWS[_choice("window", tuple(WINDOWS)) or DEFAULT_WINDOW]
    providers = rt.providers.names()
    provider = _choice("provider", providers)
    with rt.session() as session:
        found = load_overview(session, window, provider, utcnow())
    codes = list(found.errors)
    if found.other_errors:
        codes.append(("other codes", found.other_errors))
    return render_template(
        "dashboard_overview.html",
        overview=found,
        jobs=jobs_chart(found),
        durations=duration_chart(found),
        errors=error_chart(codes),
        windows=WINDOWS,
        providers=providers,
        # The list's live script, unchanged (its hash is the policy's): the charts
        # follow new jobs while the page stays open.
        refresh=OVERVIEW_REFRESH_SECONDS,
        live_script=Markup(LIVE_SCRIPT),  # noqa: S704 - our constant, allowed by its hash
        index_url=index_url,
    )


@dataclass(frozen=True)
class Notice:
    """The one line a job page shows after an action (named by ?notice=)."""

    text: str
    job_id: uuid.UUID | None = None  # the other job it is about (a retry's original)


def _notice(job: JobPage) -> Notice | None:
    # Codes, not text, in the URL: nobody can make the dashboard display a message of theirs.
    kind = request.args.get("notice")
    if kind == "cancelled":
        return Notice("Cancelled.")
    if kind == "ended":
        return Notice(f"Nothing to cancel: the job had already ended ({job.status}).")
    if kind == "retried":
        try:
            original = uuid.UUID(request.args.get("of", ""))
        except ValueError:
            original = None
        return Notice("Created as a retry of job", original)
    return None


@bp.get("/jobs/<uuid:job_id>")
def job_detail(job_id: uuid.UUID) -> ResponseReturnValue:
    settings = runtime().settings
    with runtime().session() as session:
        job = load_job_page(session, job_id, settings)
    if job is None:
        abort(404)
    return render_template(
        "dashboard_job.html",
        job=job,
        notice=_notice(job),
        csrf_token=access.issue_token(settings, _user(), time.time()),
        index_url=index_url,
        now=utcnow(),
    )


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


# --- acting (through worker.api, as the HTTP API does; CSRF in _protect_writes) ----------


def _after_action(job_id: uuid.UUID, notice: str, **args: Any) -> ResponseReturnValue:
    # 303: the browser GETs the job page, so a reload does not post the form again.
    return redirect(url_for("dashboard.job_detail", job_id=job_id, notice=notice, **args), 303)


@bp.post("/jobs/<uuid:job_id>/cancel")
def cancel(job_id: uuid.UUID) -> ResponseReturnValue:
    rt = runtime()
    with rt.session() as session:
        before = job_status(session, job_id)
    if before is None:
        abort(404)
    reason = f"cancelled from the dashboard by {_user()[:MAX_USER_IN_REASON]}"
    try:
        after = cancel_job(job_id, reason, runtime=rt)
    except JobNotFound:
        abort(404)
    # A job that ended meanwhile (or before) is left as it was: say so.
    cancelled_now = not before.is_terminal and after.status is JobStatus.CANCELLED
    return _after_action(job_id, "cancelled" if cancelled_now else "ended")


@bp.post("/jobs/<uuid:job_id>/retry")
def retry(job_id: uuid.UUID) -> ResponseReturnValue:
    rt = runtime()
    with rt.session() as session:
        status = job_status(session, job_id)
    if status is None:
        abort(404)
    if not status.is_terminal:
        # One job at a time asking the same: the page offers a retry only once it ended.
        abort(409, description=f"The job is still {status.value}: only an ended job is retried.")
    try:
        # One retry per rendered form: a double click sends the same token, so the same key.
        form_token = request.form.get("csrf_token", "")
        key = f"dashboard-retry-{job_id}-{hashlib.sha256(form_token.encode()).hexdigest()[:16]}"
        new = resubmit_job(job_id, idempotency_key=key, runtime=rt)
    except JobNotFound:
        abort(404)
    except InvalidInput as exc:  # e.g. its provider is no longer enabled
        abort(409, description=f"The job cannot be retried: {exc}")
    return _after_action(new.id, "retried", of=str(job_id))


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


@bp.app_template_filter("overview_seconds")
def format_seconds(value: float | None) -> str:
    return "—" if value is None else seconds_text(value)


@bp.app_template_filter("dashboard_amount")
def format_amount(value: float | None) -> str:
    """Money as it was given: up to 4 decimals (prices per image are fractions of a cent),
    without trailing zeros."""
    if value is None:
        return "—"
    return f"{value:,.4f}".rstrip("0").rstrip(".")
