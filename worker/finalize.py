"""After a job ends: archive its result images, then tell the application.

Runs in the ``finalize_job`` task, sent after the terminal state commits.
Each step records what it did as a job event and is safe to repeat: archived
files are rewritten in place, and the notification carries a ``webhook-id``
that stays the same across retries so receivers can drop duplicates.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from standardwebhooks.webhooks import Webhook

from worker.config import Settings
from worker.db import session_scope
from worker.images import check_public_host
from worker.jobs import lock_job, record_event
from worker.models import Job, utcnow
from worker.providers.base import UpstreamError
from worker.results import job_folder
from worker.states import EventKind, JobStatus, Source

log = logging.getLogger(__name__)

IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class NotifyFailed(Exception):
    """The application's endpoint did not take the notification (worth retrying)."""


@dataclass(frozen=True)
class Archived:
    urls: list[str]
    errors: list[str]


def archive_results(job: Job, settings: Settings, client: httpx.Client) -> Archived:
    """Copy a completed job's result images into the result store; provider URLs expire."""
    folder = job_folder(settings, job.id)
    urls, errors = [], []
    own_prefix = f"{settings.public_base}/results/{job.id}/"
    for n, url in enumerate(job.result_urls or [], 1):
        if url.startswith(own_prefix):  # inline results are stored already
            urls.append(url)
            continue
        try:
            name = _download(url, folder, n, settings, client)
        except (httpx.HTTPError, ValueError) as exc:
            errors.append(f"{url}: {exc}")
            continue
        urls.append(f"{settings.public_base}/results/{job.id}/{name}")
    return Archived(urls, errors)


def _download(url: str, folder: Path, n: int, settings: Settings, client: httpx.Client) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    if not settings.allow_private_urls:
        try:
            check_public_host(parts.hostname, parts.port or 443)
        except UpstreamError as exc:
            raise ValueError(exc.message) from None
    # Only the URL the provider returned: no redirects to somewhere else.
    with client.stream(
        "GET", url, follow_redirects=False, timeout=settings.archive_timeout
    ) as response:
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code}")
        kind = response.headers.get("content-type", "").split(";")[0].strip()
        extension = IMAGE_TYPES.get(kind, "png")
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > settings.archive_max_bytes:
                raise ValueError(f"over the limit of {settings.archive_max_bytes} bytes")
            chunks.append(chunk)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{n}.{extension}"
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(b"".join(chunks))
    tmp.replace(folder / name)
    return name


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
    url: str, body: dict[str, Any], msg_id: str, settings: Settings, client: httpx.Client
) -> int:
    """POST the signed final state; returns the HTTP status or raises NotifyFailed."""
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
        response = client.post(
            url, content=payload, headers=headers, timeout=settings.notify_timeout
        )
    except httpx.HTTPError as exc:
        raise NotifyFailed(f"{type(exc).__name__}") from exc
    if not response.is_success:
        raise NotifyFailed(f"HTTP {response.status_code}")
    return response.status_code


def archive(job_id: uuid.UUID, settings: Settings, client: httpx.Client) -> None:
    """Archive once: skipped when the job has archived URLs already."""
    with session_scope() as session:
        snapshot = session.get(Job, job_id)
        if snapshot is None or snapshot.status != JobStatus.COMPLETED or snapshot.archived_urls:
            return
        result_urls = list(snapshot.result_urls or [])
    if not settings.archive_results or not result_urls:
        return
    # Downloads run outside any transaction: no row (or SQLite) lock is held meanwhile.
    archived = archive_results(snapshot, settings, client)
    with session_scope() as session:
        job = lock_job(session, job_id)
        if job is None or job.archived_urls:
            return
        job.archived_urls = archived.urls
        message = f"archived {len(archived.urls)} of {len(result_urls)} result image(s)"
        if archived.errors:
            message += "; failed: " + "; ".join(archived.errors)
        record_event(session, job, Source.FINALIZE, message)


def notify(job_id: uuid.UUID, settings: Settings, client: httpx.Client) -> bool:
    """POST to the job's notify_url; True when done (or nothing to do), False to retry."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or not job.notify_url or job.notified_at is not None:
            return True
        url, body = job.notify_url, final_state(job)
    if settings.notify_secret is None:
        _record(job_id, "notify_url set but VARIFLOW_NOTIFY_SECRET is not: not sent")
        return True
    try:
        status = post_notification(url, body, notification_id(job_id), settings, client)
    except NotifyFailed as exc:
        _record(job_id, f"notification to {_host(url)} failed: {exc}")
        return False
    with session_scope() as session:
        job = lock_job(session, job_id)
        if job is not None:
            job.notified_at = utcnow()
            record_event(session, job, Source.FINALIZE, f"notified {_host(url)}: HTTP {status}")
    return True


def _record(job_id: uuid.UUID, message: str) -> None:
    with session_scope() as session:
        job = lock_job(session, job_id)
        if job is not None:
            record_event(session, job, Source.FINALIZE, message, kind=EventKind.INFO)


def _host(url: str) -> str:
    # Events show where a notification went, not its full URL (which may carry a token).
    return urlsplit(url).netloc
