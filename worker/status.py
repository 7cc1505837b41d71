"""The words every layer shares: job statuses, who learned something, what they learned.

Plain values with no I/O and no variflow imports, so that provider adapters
(which describe what a provider said) and the transition function (which
decides what it means for a job) speak the same language without depending on
each other.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    QUEUED = "queued"
    SUBMITTED = "submitted"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @property
    def is_terminal(self) -> bool:
        return self.rank == _TERMINAL_RANK


_TERMINAL_RANK = 3
_RANK = {
    JobStatus.QUEUED: 0,
    JobStatus.SUBMITTED: 1,
    JobStatus.PROCESSING: 2,
    JobStatus.COMPLETED: _TERMINAL_RANK,
    JobStatus.FAILED: _TERMINAL_RANK,
    JobStatus.CANCELLED: _TERMINAL_RANK,
}
TERMINAL_STATUSES = frozenset(s for s in JobStatus if s.is_terminal)
ACTIVE_UPSTREAM_STATUSES = frozenset({JobStatus.SUBMITTED, JobStatus.PROCESSING})


class Source(StrEnum):
    """Who learned what an update says."""

    API = "api"
    SUBMIT = "submit"
    WEBHOOK = "webhook"
    POLL = "poll"
    SWEEP = "sweep"
    CANCEL = "cancel"
    FINALIZE = "finalize"


class EventKind(StrEnum):
    TRANSITION = "transition"
    PROGRESS = "progress"
    IGNORED = "ignored"
    INFO = "info"


@dataclass(frozen=True)
class UpstreamState:
    """What one source says the job's state is now."""

    status: JobStatus
    source: Source
    progress: int | None = None
    image_urls: tuple[str, ...] = ()
    error_code: str | None = None
    error_message: str | None = None
    upstream_task_id: str | None = None
    # A small, redacted summary of what was received, kept in the event.
    payload: Mapping[str, Any] | None = None
    # Result images the provider sent inline (base64): stored by variflow and
    # turned into image_urls (worker.results.store_inline) before a transition.
    images: tuple[bytes, ...] = field(default=(), repr=False)
    # What the task cost, when the provider reports it (PiAPI's meta.usage points).
    cost: float | None = None


@dataclass(frozen=True)
class TerminalJob:
    """A job that reached a terminal status, as its after-commit consumers see it."""

    job_id: uuid.UUID
    provider: str
    status: str
    created_at: datetime
    submitted_at: datetime | None
    completed_at: datetime
    # Nothing was left to do after the end: finalized with the end, no finalize_job.
    finalized: bool = False
