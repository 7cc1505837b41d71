"""Job statuses and the one transition function.

Webhooks, polls, the submit flow, the sweep and cancel all describe what they
learned as an :class:`UpstreamState` and hand it to :func:`transition`, which
decides what to write and which event to record. It is pure: no I/O, no clock
(``now`` is passed in), so every rule is testable on its own.

Rules: status only moves forward (queued < submitted < processing < terminal);
a terminal job never changes; a stale, duplicate or out-of-order update —
including one about an upstream task that is not the job's — is an ``ignored``
event, never an exception.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

from worker.errors import ErrorCode
from worker.status import (
    ACTIVE_UPSTREAM_STATUSES,
    TERMINAL_STATUSES,
    EventKind,
    JobStatus,
    Source,
    UpstreamState,
)

__all__ = [
    "ACTIVE_UPSTREAM_STATUSES",
    "NO_RESULT",
    "TERMINAL_STATUSES",
    "UPSTREAM_FAILED",
    "EventKind",
    "EventRecord",
    "JobLike",
    "JobStatus",
    "Source",
    "Transition",
    "UpstreamState",
    "foreign_task",
    "leaves_task_running",
    "transition",
    "usable_results",
]


class JobLike(Protocol):
    """The fields of a job the transition reads (the ORM Job satisfies it)."""

    @property
    def status(self) -> str: ...
    @property
    def progress(self) -> int: ...
    @property
    def upstream_task_id(self) -> str | None: ...
    @property
    def submitted_at(self) -> datetime | None: ...


@dataclass(frozen=True)
class EventRecord:
    source: Source
    kind: EventKind
    from_status: JobStatus
    to_status: JobStatus
    message: str | None = None
    payload: Mapping[str, Any] | None = None
    # Same status, nothing new: pollers skip recording these (one per poll otherwise).
    duplicate: bool = False


@dataclass(frozen=True)
class Transition:
    changes: Mapping[str, Any] = field(default_factory=dict)
    event: EventRecord | None = None

    @property
    def applied(self) -> bool:
        return bool(self.changes)

    @property
    def became_terminal(self) -> bool:
        return self.event is not None and (
            self.event.kind is EventKind.TRANSITION and self.event.to_status.is_terminal
        )


# More result images than any provider returns for one job (PiAPI 4, LemonData up to
# 10): a provider answering with thousands is not believed, and not stored.
MAX_RESULTS = 16
MAX_URL_LENGTH = 2048  # the longest URL a job keeps (result_urls, poll_url columns)
NO_RESULT = ErrorCode.NO_RESULT.value
UPSTREAM_FAILED = ErrorCode.UPSTREAM_FAILED.value


def transition(job: JobLike, update: UpstreamState, now: datetime) -> Transition:
    """Decide what ``update`` changes on ``job``: the columns to write and the event."""
    current = JobStatus(job.status)

    def ignored(reason: str, duplicate: bool = False) -> Transition:
        return Transition(
            event=EventRecord(
                update.source,
                EventKind.IGNORED,
                current,
                update.status,
                reason,
                update.payload,
                duplicate,
            )
        )

    if current.is_terminal:
        return ignored(f"job is already {current}")
    if foreign_task(job, update):
        return ignored(f"update is for upstream task {update.upstream_task_id!r}")
    if update.status.rank < current.rank:
        return ignored(f"stale: {update.status} after {current}")

    progress = _clamp(update.progress) if update.progress is not None else None
    if update.status == current:
        if progress is not None and progress > job.progress:
            return Transition(
                changes={"progress": progress, "updated_at": now},
                event=EventRecord(
                    update.source,
                    EventKind.PROGRESS,
                    current,
                    current,
                    f"progress {progress}%",
                    update.payload,
                ),
            )
        return ignored(f"duplicate: already {current}", duplicate=True)

    target, error_code, error_message = _resolve_target(update)
    changes: dict[str, Any] = {"status": target.value, "updated_at": now}
    if update.upstream_task_id and not job.upstream_task_id:
        changes["upstream_task_id"] = update.upstream_task_id
    if current is JobStatus.QUEUED:
        changes["claim_token"] = None
        changes["claimed_until"] = None
        changes["retry_at"] = None
        changes["create_started_at"] = None
    # submitted_at means "the provider accepted it": it named a task, or the job
    # reached a status only an accepted job can have.
    accepted = bool(update.upstream_task_id or job.upstream_task_id) or target in (
        JobStatus.SUBMITTED,
        JobStatus.PROCESSING,
        JobStatus.COMPLETED,
    )
    if accepted and job.submitted_at is None:
        changes["submitted_at"] = now
    if progress is not None and progress > job.progress:
        changes["progress"] = progress

    message: str | None = None
    if target is JobStatus.COMPLETED:
        kept, note = usable_results(update.image_urls)
        changes["progress"] = 100
        changes["result_urls"] = list(kept)
        message = note
    if target in (JobStatus.FAILED, JobStatus.CANCELLED):
        changes["error_code"] = error_code
        changes["error_message"] = error_message
        message = f"{error_code}: {error_message}" if error_code else error_message
    if target.is_terminal:
        changes["completed_at"] = now
        changes["next_poll_at"] = None
        if update.cost is not None:
            changes["cost"] = update.cost  # what the provider reported it cost
    return Transition(
        changes=changes,
        event=EventRecord(
            update.source, EventKind.TRANSITION, current, target, message, update.payload
        ),
    )


def foreign_task(job: JobLike, update: UpstreamState) -> bool:
    """The update is about an upstream task that is not the one this job follows.

    The one home of this rule: the transition ignores such an update, and the
    webhook receiver answers it with 409 (a provider calling the wrong job's
    URL is a bug on its side worth seeing, not a retry).
    """
    return bool(
        update.upstream_task_id
        and job.upstream_task_id
        and update.upstream_task_id != job.upstream_task_id
    )


def leaves_task_running(
    status: JobStatus | str, error_code: str | None, upstream_task_id: str | None
) -> bool:
    """The job ended unwanted (cancelled, or timed out) while a task it created may
    still run upstream, and bill: finalize asks the provider to stop it."""
    unwanted = status == JobStatus.CANCELLED or error_code == ErrorCode.TIMEOUT
    return bool(upstream_task_id) and unwanted


def usable_results(urls: Iterable[str]) -> tuple[tuple[str, ...], str | None]:
    """The result URLs a job keeps — http(s) with a host, at most :data:`MAX_RESULTS` —
    and a note of what was dropped (None when nothing was)."""
    kept: list[str] = []
    unusable = excess = 0
    for url in urls:
        if not _is_result_url(url):
            unusable += 1
        elif len(kept) >= MAX_RESULTS:
            excess += 1
        else:
            kept.append(url)
    notes = []
    if unusable:
        notes.append(f"dropped {unusable} result URL(s) that are not http(s)")
    if excess:
        notes.append(f"dropped {excess} result URL(s) over the limit of {MAX_RESULTS}")
    return tuple(kept), "; ".join(notes) or None


def _is_result_url(url: object) -> bool:
    if not isinstance(url, str) or not 0 < len(url) <= MAX_URL_LENGTH:
        return False
    if any(ch.isspace() or ord(ch) < 32 or 0xD800 <= ord(ch) <= 0xDFFF for ch in url):
        return False
    try:
        parts = urlsplit(url)
        return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an unbalanced [ in the host
        return False


def _resolve_target(update: UpstreamState) -> tuple[JobStatus, str | None, str | None]:
    if update.status is JobStatus.COMPLETED:
        kept, note = usable_results(update.image_urls)
        if not kept:
            # A "completed" that carries nothing the user paid for is a failure.
            message = "provider reported completion without result images"
            return JobStatus.FAILED, NO_RESULT, f"{message} ({note})" if note else message
    if update.status is JobStatus.FAILED:
        return (
            JobStatus.FAILED,
            update.error_code or UPSTREAM_FAILED,
            update.error_message or "provider reported failure without a message",
        )
    if update.status is JobStatus.CANCELLED:
        return JobStatus.CANCELLED, update.error_code, update.error_message
    return update.status, None, None


def _clamp(progress: int) -> int:
    return max(0, min(100, int(progress)))
