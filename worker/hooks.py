"""What happens after a job's terminal state is committed.

apply_update() notes terminal transitions on the session; once the
transaction commits (never before: a rolled-back change must not notify
anyone), each is handed to the callbacks registered here.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import event
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

PENDING_KEY = "variflow_terminal_jobs"


@dataclass(frozen=True)
class TerminalJob:
    job_id: uuid.UUID
    provider: str
    status: str
    created_at: datetime
    submitted_at: datetime | None
    completed_at: datetime


Callback = Callable[[TerminalJob], None]
_callbacks: list[Callback] = []


def on_terminal(callback: Callback) -> Callback:
    """Register a callback (a decorator); callbacks must be quick and must not raise."""
    _callbacks.append(callback)
    return callback


def note_terminal(session: Session, job: TerminalJob) -> None:
    session.info.setdefault(PENDING_KEY, []).append(job)


def _after_commit(session: Session) -> None:
    pending = session.info.pop(PENDING_KEY, [])
    if pending:
        _load_consumers()
    for job in pending:
        for callback in _callbacks:
            try:
                callback(job)
            except Exception:  # one broken consumer must not hide the others
                log.exception("terminal hook %s failed for job %s", callback, job.job_id)


@functools.cache
def _load_consumers() -> None:
    # The consumers register themselves on import; every process that can end
    # a job (web app, worker, an application calling cancel_job) loads them.
    import worker.tasks  # noqa: F401  (finalize_job: archive + notify)


def _after_rollback(session: Session) -> None:
    session.info.pop(PENDING_KEY, None)


def install(session_factory: object) -> None:
    event.listen(session_factory, "after_commit", _after_commit)
    event.listen(session_factory, "after_soft_rollback", lambda s, _tx: _after_rollback(s))
