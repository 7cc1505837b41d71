"""What happens after a job's terminal state is committed.

:func:`worker.jobs.apply_update` notes terminal transitions on the session;
once the transaction commits (never before: a rolled-back change must not
notify anyone), each is handed to the consumers the process's entry point
gave its :class:`worker.db.Database` — sending ``finalize_job`` and counting
the job in the metrics. Nothing registers itself by being imported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from worker.status import TerminalJob

log = logging.getLogger(__name__)

PENDING_KEY = "variflow_terminal_jobs"
AFTER_THE_END_KEY = "variflow_after_the_end"

Consumer = Callable[[TerminalJob], None]

__all__ = [
    "AfterTheEnd",
    "Consumer",
    "TerminalJob",
    "after_the_end",
    "committed_anyway",
    "hand_over",
    "install",
    "note_terminal",
]


@dataclass(frozen=True)
class AfterTheEnd:
    """Whether a job that just ended leaves work for finalize_job.

    Most jobs leave none (no archive, no notification, no on-complete task):
    their end and ``finalized_at`` are then written in one statement and no
    finalize_job message is sent at all. The transition's writer asks here.
    """

    archive_results: bool
    default_on_complete_task: bool

    def work_left(
        self,
        *,
        status: str,
        has_results: bool,
        notify_url: str | None,
        on_complete_task: str | None,
        stop_upstream: bool,
    ) -> bool:
        return (
            stop_upstream
            or bool(notify_url)
            or bool(on_complete_task)
            or self.default_on_complete_task
            or (self.archive_results and status == "completed" and has_results)
        )


def after_the_end(session: Session) -> AfterTheEnd | None:
    """The policy of this session's process (None: every ended job is finalized by a task)."""
    policy: AfterTheEnd | None = session.info.get(AFTER_THE_END_KEY)
    return policy


def note_terminal(session: Session, job: TerminalJob) -> None:
    session.info.setdefault(PENDING_KEY, []).append(job)


def install(factory: sessionmaker[Session], consumers: Sequence[Consumer]) -> None:
    """Hand every terminal job noted in a session of ``factory`` to ``consumers`` after commit.

    Consumers must be quick and must not raise; one that does is logged and
    the others still run.
    """
    chosen = tuple(consumers)

    def after_commit(session: Session) -> None:
        hand_over(session.info.pop(PENDING_KEY, []), chosen)

    def after_rollback(session: Session, _transaction: object) -> None:
        session.info.pop(PENDING_KEY, None)

    event.listen(factory, "after_commit", after_commit)
    event.listen(factory, "after_soft_rollback", after_rollback)


def hand_over(ended: Sequence[TerminalJob], consumers: Sequence[Consumer]) -> None:
    """Tell ``consumers`` about jobs whose terminal state is committed."""
    for job in ended:
        for consumer in consumers:
            try:
                consumer(job)
            except Exception:  # one broken consumer must not hide the others
                log.exception("terminal consumer %s failed for job %s", consumer, job.job_id)


def committed_anyway(session: Session) -> list[TerminalJob]:
    """The terminal jobs noted in an autocommit session, whose writes are committed
    already (each statement commits itself), taken before a rollback forgets them."""
    ended: list[TerminalJob] = session.info.pop(PENDING_KEY, [])
    return ended
