"""Provider webhooks: verify, find the job, apply through the transition function.

Answers: 413 body over 1 MiB, 404 unknown provider or job, 401 missing or
wrong secret (nothing is touched), 400 malformed body (also a task id that
could not be stored: too long, NUL, lone surrogate), 409 a task id that is not
the job's (or that another job follows), 503 with Retry-After when the
database is unreachable or the job's row kept changing under the delivery
(the provider delivers again), otherwise 200 — also for duplicates and stale
deliveries, which are recorded as ignored events so the provider stops
retrying them. Never a 5xx for what a body holds: the state is made safe
to store first (worker.upstream_text), so a provider never retries a delivery
that cannot succeed.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, abort, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session

from webhooks.context import runtime
from webhooks.limits import MAX_BODY_BYTES
from webhooks.metrics import note_webhook_event
from worker import jobs
from worker.errors import InvalidInput
from worker.jobs import PollPlan
from worker.models import Job
from worker.providers.base import Provider
from worker.states import UpstreamState, foreign_task
from worker.upstream_text import storable, task_id_problem
from worker.webhook_secrets import secret_matches

bp = Blueprint("webhooks", __name__, url_prefix="/webhooks")
log = logging.getLogger(__name__)


def _error(status: int, message: str) -> tuple[Response, int]:
    return jsonify(error=message), status


def _webhook_provider(name: str) -> Provider | None:
    try:
        provider = runtime().providers.get(name)
    except InvalidInput:
        return None
    return provider if provider.supports_webhook else None


def _parse(provider: Provider) -> UpstreamState | tuple[Response, int]:
    """The state the body reports, safe to store (worker.upstream_text), or a 400."""
    try:
        # PiAPI's Content-Type is undocumented: parse the body whatever it says.
        body: Any = request.get_json(force=True, silent=True)
    except RecursionError:  # nested deeper than the parser goes (silent=True covers the rest)
        return _error(400, "body must be JSON (it nests too deeply)")
    if body is None:
        return _error(400, "body must be JSON")
    try:
        state = provider.parse_webhook(body)
    except (ValueError, RecursionError) as exc:
        return _error(400, str(exc) or "malformed body")
    problem = task_id_problem(state.upstream_task_id) if state.upstream_task_id else None
    if problem is not None:
        return _error(400, f"task id: {problem}")
    return storable(state)


def _read_body() -> None:
    """Read the body first: over 1 MiB is 413 before anything else is looked at.

    Flask raises 413 itself when Content-Length says so; a chunked body has
    none, and the server's stream then just stops at the limit, so the app's
    limit is one byte larger (see create_app) and anything past it is refused.
    """
    if len(request.get_data(cache=True)) > MAX_BODY_BYTES:
        abort(413)


@bp.post("/<provider_name>/<job_id>")
def job_webhook(provider_name: str, job_id: str) -> ResponseReturnValue:
    _read_body()
    provider = _webhook_provider(provider_name)
    try:
        job_uuid = uuid.UUID(job_id)
    except ValueError:
        return _error(404, "unknown job")
    if provider is None:
        return _error(404, "unknown provider")
    assert provider.webhook_secret_header is not None
    # No transaction holds a lock: the row is read, and the write is guarded by
    # what was read (jobs.accept_webhook): two round trips per delivery.
    with runtime().autocommit() as session:
        job = jobs.read_row(session, job_uuid)
        if job is None or job.provider != provider.name:
            return _error(404, "unknown job")
        given = request.headers.get(provider.webhook_secret_header)

        def signed(current: Job) -> None:
            if not secret_matches(given, current.webhook_secret_hash):
                log.warning("webhook for job %s: missing or wrong secret", current.id)
                raise Refused(401, "missing or wrong secret")

        try:
            signed(job)
        except Refused as refused:
            return _error(refused.status, refused.message)
        state = _parse(provider)
        if not isinstance(state, UpstreamState):
            return state
        return _apply(session, job, provider, state, signed)


@bp.post("/<provider_name>")
def global_webhook(provider_name: str) -> ResponseReturnValue:
    _read_body()
    provider = _webhook_provider(provider_name)
    if provider is None:
        return _error(404, "unknown provider")
    assert provider.webhook_secret_header is not None
    expected = runtime().settings.webhook_secret(provider.name)
    given = request.headers.get(provider.webhook_secret_header)
    if not expected or not given or not hmac.compare_digest(given.encode(), expected.encode()):
        log.warning("global %s webhook: missing or wrong secret", provider.name)
        return _error(401, "missing or wrong secret")
    state = _parse(provider)
    if not isinstance(state, UpstreamState):
        return state
    if not state.upstream_task_id:
        return _error(400, "the body names no task id")
    with runtime().autocommit() as session:
        job = jobs.read_by_task(session, provider.name, state.upstream_task_id)
        if job is None:
            return _error(404, "no job for this task id")
        return _apply(session, job, provider, state)


class Refused(Exception):
    """A check of the delivery failed on the row as (re-)read: answer ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _apply(
    session: Session,
    job: Job,
    provider: Provider,
    state: UpstreamState,
    signed: Callable[[Job], None] | None = None,
) -> ResponseReturnValue:
    def belongs(current: Job) -> None:
        # A webhook names its task: one for another task, or for none while the job
        # follows one, does not belong to this job.
        if foreign_task(current, state) or (
            current.upstream_task_id and not state.upstream_task_id
        ):
            raise Refused(409, "task id does not match this job")

    def admits(current: Job) -> None:
        """The delivery's checks again, on a row read anew (the caller signed the first)."""
        if signed is not None:
            signed(current)  # a new claim meanwhile brings a new secret
        belongs(current)

    plan = PollPlan.of(runtime().settings, provider.webhook_grace)
    job_id = job.id
    try:
        belongs(job)
        result = jobs.accept_webhook(session, job, state, plan, guarded=True, verify=admits)
    except Refused as refused:
        return _error(refused.status, refused.message)
    except jobs.TaskIdTaken:
        session.rollback()
        return _error(409, "task id belongs to another job")
    except jobs.RowBusy:
        log.warning("webhook for job %s: the job kept changing; answered 503", job_id)
        return jsonify(error="the job is busy; deliver again"), 503, {"Retry-After": "1"}
    except (DataError, UnicodeEncodeError) as exc:
        # A value the database refuses (or its driver cannot encode) that storable() let
        # through, a bug to fix there: refuse the body rather than have the provider
        # retry it forever. The log names no value (the parameters are the payload).
        session.rollback()
        log.error(
            "webhook for job %s: the database refused a value (%s)",
            job_id,
            type(getattr(exc, "orig", exc)).__name__,
        )
        return _error(400, "body holds a value that cannot be stored")
    note_webhook_event(result.event)  # for the deliveries metric (webhooks/metrics.py)
    outcome = result.event.kind.value if result.event else "ignored"
    return jsonify(job_id=str(job.id), status=job.status, outcome=outcome)
