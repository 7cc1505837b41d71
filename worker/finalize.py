"""After a job ends: stop its task upstream if unwanted, archive its result images,
then tell the application.

Runs in the ``finalize_job`` task, sent after the terminal state commits (and
re-sent by the sweep until ``finalized_at``). Each step records what it did as
a job event and is safe to repeat: archived images are written again under the
same names (a file or an S3 object), and the notification carries a
``webhook-id`` that stays the same across retries so receivers can drop duplicates.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from standardwebhooks.webhooks import Webhook

from worker import jobs
from worker.backoff import Backoff
from worker.config import Settings
from worker.db import Database, retry_dropped
from worker.errors import UpstreamError, VariflowError
from worker.models import Job, utcnow
from worker.outbound import Outbound, OutboundRefused, Resolver, describe
from worker.providers.base import PollTarget
from worker.result_store import ResultStore, open_store
from worker.results import stored_url
from worker.runtime import Runtime
from worker.states import JobStatus, Source, leaves_task_running

log = logging.getLogger(__name__)

IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class NotifyFailed(VariflowError):
    """The application's endpoint did not take the notification (worth retrying)."""


class NotifyRefused(NotifyFailed):
    """The notify_url is refused (a non-public address, a host that does not resolve):
    retrying cannot help."""


# The endpoint's answer is not read; a cap all the same.
NOTIFY_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Archived:
    urls: list[str]
    errors: list[str]


def archive_results(
    job: Job,
    settings: Settings,
    client: httpx.Client,
    *,
    resolver: Resolver | None = None,
    store: ResultStore | None = None,
) -> Archived:
    """Copy a completed job's result images into the result store; provider URLs expire.

    ``store``: the process's (Runtime.results), else one opened from ``settings``.
    Raises OSError (StoreUnavailable for S3) when the store cannot take them: the
    finalize task fails and the sweep offers it again, rather than giving up on images
    whose provider URLs will expire.
    """
    store = store or open_store(settings)
    urls, errors = [], []
    own_prefix = stored_url(settings, job.id, "")
    for n, url in enumerate(job.result_urls or [], 1):
        if url.startswith(own_prefix):  # inline results are stored already
            urls.append(url)
            continue
        try:
            name, data, kind = _download(url, n, settings, client, resolver)
        except (httpx.HTTPError, ValueError) as exc:
            errors.append(f"{url}: {exc}")
            continue
        store.put(job.id, name, data, kind)  # the same name again when a task runs twice
        urls.append(stored_url(settings, job.id, name))
    return Archived(urls, errors)


def _download(
    url: str,
    n: int,
    settings: Settings,
    client: httpx.Client,
    resolver: Resolver | None = None,
) -> tuple[str, bytes, str]:
    """Result image ``n``: its name in the store, its bytes and its content type."""
    # Through the guarded client: only the URL the provider returned (no redirect
    # to somewhere else), a public address unless allowed, within the size and time caps.
    # Raises OutboundRefused / ResponseTooLarge (ValueErrors) or an httpx error.
    with Outbound(client, settings, resolver).open(
        "GET", url, timeout=settings.archive_timeout, max_bytes=settings.archive_max_bytes
    ) as reply:
        if reply.status_code != 200:
            raise ValueError(f"HTTP {reply.status_code}")
        kind = reply.headers.get("content-type", "").split(";")[0].strip()
        if kind not in IMAGE_TYPES:
            kind = "image/png"
        data = reply.read()
    return f"{n}.{IMAGE_TYPES[kind]}", data, kind


def final_state(job: Job) -> dict[str, Any]:
    """What the application is told: the job as it ended."""
    return {
        "type": f"job.{job.status}",
        "timestamp": utcnow().isoformat(),
        "data": {
            "id": str(job.id),
            "provider": job.provider,
            "status": job.status,
            "idempotency_key": job.idempotency_key,
            "upstream_task_id": job.upstream_task_id,
            "result_urls": job.result_urls or [],
            "archived_urls": job.archived_urls or [],
            "error_code": job.error_code,
            "error_message": job.error_message,
            "created_at": job.created_at.isoformat(),
            "completed_at": job.completed_at.isoformat() if job.completed_at else None,
        },
    }


def notification_id(job_id: uuid.UUID) -> str:
    """Stable across retries: the receiver's key for dropping duplicates."""
    return f"msg_{job_id.hex}"


def post_notification(
    url: str,
    body: dict[str, Any],
    msg_id: str,
    settings: Settings,
    client: httpx.Client,
    *,
    resolver: Resolver | None = None,
) -> int:
    """POST the signed final state; returns the HTTP status or raises NotifyFailed
    (NotifyRefused when the URL is refused: a non-public address, a host that does not resolve).
    """
    assert settings.notify_secret is not None
    payload = json.dumps(body, separators=(",", ":"))
    now = datetime.now(UTC)
    signature = Webhook(settings.notify_secret.get_secret_value()).sign(msg_id, now, payload)
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }
    try:
        with Outbound(client, settings, resolver).open(
            "POST",
            url,
            timeout=settings.notify_timeout,
            max_bytes=NOTIFY_ANSWER_BYTES,
            headers=headers,
            content=payload.encode(),
        ) as reply:
            status = reply.status_code  # the answer's body is never read
    except OutboundRefused as exc:
        raise NotifyRefused(exc.message) from None
    except httpx.HTTPError as exc:
        raise NotifyFailed(describe(exc)) from exc
    if not 200 <= status < 300:
        raise NotifyFailed(f"HTTP {status}")
    return status


# Notifications are retried on this schedule until VARIFLOW_NOTIFY_RETRY_FOR passes.
# "Equal jitter": within [c/2, c], c = min(300, 2**retries) seconds.
NOTIFY_BACKOFF = Backoff(start=1.0, cap=300.0, jitter=0.5)

# Sends a Celery task by name: (name, args, kwargs, queue).
SendTask = Callable[[str, list[str], dict[str, str], str], None]


def finalize(
    job_id: uuid.UUID, runtime: Runtime, send_task: SendTask, retries: int
) -> float | None:
    """Do what is left of a job's after-the-end work; seconds until a retry, or None when done.

    Re-runnable: each step checks what is already done (archived_urls,
    on_complete_sent_at, notified_at). The job is read once; each step that
    did something writes it in a transaction of its own.
    """
    settings, db = runtime.settings, runtime.db
    job = retry_dropped(lambda: _read(db, job_id))
    if job is None:
        return None
    # Here rather than in a message of its own: finalize_job is re-sent by the
    # sweep until it finishes, so a lost message cannot leave a paid task running.
    if retries == 0 and leaves_task_running(job.status, job.error_code, job.upstream_task_id):
        stop_upstream_task(job_id, runtime)
    _archive(job, settings, runtime.http, db, runtime.results)
    _send_on_complete(job, settings, db, send_task)
    notified = _notify(job, settings, runtime.http, db)
    if notified is not None:

        def record() -> None:  # idempotent: written again if the connection was dropped
            with db.session() as session:
                if notified:
                    jobs.record_notified(session, job_id, notified)
                jobs.record_finalized(session, job_id)

        retry_dropped(record)  # else Celery's retry would notify a second time
        return None
    ended = job.completed_at
    if ended is None or (utcnow() - ended).total_seconds() > settings.notify_retry_for:
        with db.session() as session:
            jobs.record_finalized(session, job_id, "gave up notifying: retry time over")
        return None
    with db.session() as session:
        jobs.touch(session, job_id)  # still working on it: the sweep leaves it be
    return NOTIFY_BACKOFF.delay(retries)


def archive(
    job_id: uuid.UUID,
    settings: Settings,
    client: httpx.Client,
    db: Database,
    store: ResultStore | None = None,
) -> None:
    """Archive once: skipped when the job has archived URLs already."""
    job = _read(db, job_id)
    if job is not None:
        _archive(job, settings, client, db, store)


def _archive(
    job: Job,
    settings: Settings,
    client: httpx.Client,
    db: Database,
    store: ResultStore | None = None,
) -> None:
    if job.status != JobStatus.COMPLETED or job.archived_urls:
        return
    result_urls = list(job.result_urls or [])
    if not settings.archive_results or not result_urls:
        return
    # Downloads run outside any transaction: no row (or SQLite) lock is held meanwhile.
    archived = archive_results(job, settings, client, store=store)
    message = f"archived {len(archived.urls)} of {len(result_urls)} result image(s)"
    if archived.errors:
        message += "; failed: " + "; ".join(archived.errors)
    with db.session() as session:
        # The notification that follows reports them.
        job.archived_urls = jobs.record_archive(session, job.id, archived.urls, message)


def notify(job_id: uuid.UUID, settings: Settings, client: httpx.Client, db: Database) -> bool:
    """POST to the job's notify_url; True when done (or nothing to do), False to retry."""
    job = _read(db, job_id)
    if job is None:
        return True
    notified = _notify(job, settings, client, db)
    if notified:
        with db.session() as session:
            jobs.record_notified(session, job_id, notified)
    return notified is not None


def _notify(job: Job, settings: Settings, client: httpx.Client, db: Database) -> str | None:
    """POST to the job's notify_url: the event to record when it was delivered, "" when
    there is nothing (more) to do, None to retry."""
    job_id = job.id
    if not job.notify_url or job.notified_at is not None:
        return ""
    url, body = job.notify_url, final_state(job)
    if settings.notify_secret is None:
        _record(db, job_id, "notify_url set but VARIFLOW_NOTIFY_SECRET is not: not sent")
        return ""
    try:
        status = post_notification(url, body, notification_id(job_id), settings, client)
    except NotifyRefused as exc:
        _record(db, job_id, f"notification to {_host(url)} not sent: {exc}")
        return ""  # done: the same URL is refused again on every retry
    except NotifyFailed as exc:
        _record(db, job_id, f"notification to {_host(url)} failed: {exc}")
        return None
    return f"notified {_host(url)}: HTTP {status}"


def _send_on_complete(job: Job, settings: Settings, db: Database, send_task: SendTask) -> None:
    """Send the application's own Celery task (named per job or by configuration), once."""
    if job.on_complete_sent_at is not None:
        return
    name = job.on_complete_task or settings.on_complete_task
    if not name:
        return
    send_task(
        name,
        [str(job.id)],
        {"status": job.status, "provider": job.provider},
        settings.on_complete_queue,
    )

    def record() -> None:  # idempotent: written again if the connection was dropped
        with db.session() as session:
            jobs.record_on_complete_sent(session, job.id, name)

    retry_dropped(record)  # else Celery's retry would send the task a second time


def stop_upstream_task(
    job_id: uuid.UUID, runtime: Runtime, upstream_task_id: str | None = None
) -> None:
    """Ask the provider to stop the job's task (or ``upstream_task_id``); record the answer.

    Safe to repeat: cancelling a task that is no longer pending is a "no".
    """
    with runtime.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            return
        task_id = upstream_task_id or job.upstream_task_id
        adapter = runtime.providers.for_account(job.provider, job.account)
        if not task_id or not adapter.can_cancel:
            return
        target = PollTarget(job.id, task_id, job.poll_url)
    try:
        cancelled = adapter.cancel(target)
    except UpstreamError as exc:
        cancelled, note = False, exc.message
    else:
        note = (
            "cancelled upstream" if cancelled else "provider could not cancel (no longer pending)"
        )
    with runtime.session() as session:
        jobs.note(session, job_id, Source.CANCEL, f"upstream task {task_id}: {note}")


def _read(db: Database, job_id: uuid.UUID) -> Job | None:
    with db.session() as session:
        return session.get(Job, job_id)


def _record(db: Database, job_id: uuid.UUID, message: str) -> None:
    with db.session() as session:
        jobs.note(session, job_id, Source.FINALIZE, message)


def _host(url: str) -> str:
    # Events show where a notification went, not its full URL (which may carry a token).
    return urlsplit(url).netloc
