"""The emulated upstream task and its time-based lifecycle.

A task's whole future is fixed when it is created: how long it stays pending
and processing and whether it ends completed or failed. Its status at any
moment is computed from the clock, so nothing has to "advance" tasks and a
client polling at any rate sees a consistent story. Two later changes exist:
cancelling, and -- for a task created while its key had no free slot -- the
moment it gets one (``start_mono``, set by ``sandbox.capacity``). Until then it
is ``staged``; its lifecycle counts from that moment, not from its creation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from sandbox.capacity import key_fingerprint

Provider = Literal["piapi", "piclaza", "lemondata"]
Outcome = Literal["completed", "failed"]
Status = Literal["staged", "pending", "processing", "completed", "failed"]

CANCEL_MESSAGE = "task canceled by user"


@dataclass(frozen=True)
class TaskView:
    """What a task looks like at one moment."""

    status: Status
    progress: int
    started_at: float | None
    ended_at: float | None
    error_message: str

    @property
    def terminal(self) -> bool:
        return self.status in ("completed", "failed")


@dataclass(frozen=True)
class TaskSnapshot:
    """A read-only copy of a task for tests and ``GET /_sandbox/tasks``."""

    provider: str
    task_id: str
    correlation: str
    decided_outcome: str
    error_message: str
    status: str
    progress: int
    cancelled: bool
    create_count: int
    created_at: float
    result_urls: list[str]
    request: dict[str, Any]
    # The API key that created the task, as /_sandbox/stats names it (keys are secrets).
    key_fingerprint: str = ""


@dataclass
class Task:
    provider: Provider
    task_id: str
    correlation: str
    outcome: Outcome
    error_message: str
    created_at: float
    created_mono: float
    pending_seconds: float
    processing_seconds: float
    public_base: str
    request: dict[str, Any]
    result_files: list[str]
    create_count: int
    grid_file: str | None = None
    # Provider-specific fixed values (Piclaza group id, LemonData response format...).
    extra: dict[str, Any] = field(default_factory=dict)
    # The key whose capacity the task uses ("" for tasks made without a request).
    api_key: str = ""
    # When the task got a slot; None while staged.
    start_mono: float | None = None
    cancelled_mono: float | None = None
    cancelled_at: float | None = None

    @property
    def end_mono(self) -> float | None:
        """When the task is terminal; None while it is staged and not cancelled."""
        if self.cancelled_mono is not None:
            return self.cancelled_mono
        if self.start_mono is None:
            return None
        return self.start_mono + self.pending_seconds + self.processing_seconds

    @property
    def incorrect(self) -> bool:
        """Ends failed by the provider's decision: what PiAPI's daily allowance counts."""
        return self.outcome == "failed" and self.cancelled_mono is None

    @property
    def start_at(self) -> float | None:
        """Unix time the task got its slot (it then is ``pending``)."""
        if self.start_mono is None:
            return None
        return self.created_at + (self.start_mono - self.created_mono)

    def file_url(self, name: str) -> str:
        return f"{self.public_base}/files/{name}"

    @property
    def result_urls(self) -> list[str]:
        return [self.file_url(name) for name in self.result_files]

    @property
    def grid_url(self) -> str:
        return self.file_url(self.grid_file) if self.grid_file else ""

    def view(self, now_mono: float) -> TaskView:
        if self.cancelled_mono is not None and now_mono >= self.cancelled_mono:
            return self.view_for("failed", cancelled=True)
        if self.start_mono is None or now_mono < self.start_mono:
            return self.view_for("staged")
        elapsed = now_mono - self.start_mono
        if elapsed < self.pending_seconds:
            return self.view_for("pending")
        if elapsed < self.pending_seconds + self.processing_seconds:
            share = (elapsed - self.pending_seconds) / self.processing_seconds
            return self.view_for("processing", progress=min(99, max(0, int(share * 100))))
        return self.view_for(self.outcome)

    def view_for(self, status: Status, *, progress: int = 0, cancelled: bool = False) -> TaskView:
        """The view at the moment the task enters ``status`` (used for webhooks too)."""
        # PiAPI's started_at is when processing starts; staged and pending come before.
        slot_at = self.start_at if self.start_at is not None else self.created_at
        started = slot_at + self.pending_seconds
        ended = started + self.processing_seconds
        if cancelled:
            return TaskView("failed", 0, None, self.cancelled_at, CANCEL_MESSAGE)
        if status in ("staged", "pending"):
            return TaskView(status, 0, None, None, "")
        if status == "processing":
            return TaskView("processing", progress, started, None, "")
        if status == "completed":
            return TaskView("completed", 100, started, ended, "")
        return TaskView("failed", 0, started, ended, self.error_message)

    def snapshot(self, now_mono: float) -> TaskSnapshot:
        current = self.view(now_mono)
        completed = current.status == "completed"
        return TaskSnapshot(
            provider=self.provider,
            task_id=self.task_id,
            correlation=self.correlation,
            decided_outcome=self.outcome,
            error_message=self.error_message,
            status=current.status,
            progress=current.progress,
            cancelled=self.cancelled_mono is not None,
            create_count=self.create_count,
            created_at=self.created_at,
            result_urls=self.result_urls if completed else [],
            request=copy.deepcopy(self.request),
            key_fingerprint=key_fingerprint(self.api_key),
        )
