"""A job that ends with nothing left to do is finalized by its terminal write itself
(worker.hooks.AfterTheEnd); one with work left gets finalize_job, as always.

Each case ends a job through the transition writer on a real database, with a
runtime whose consumer records what "a job ended" hands over after commit.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.conftest import Configure
from tests.webhook_support import insert_job, row
from worker import celery_app, jobs
from worker.errors import ErrorCode
from worker.runtime import Runtime
from worker.states import JobStatus, Source, UpstreamState
from worker.status import TerminalJob

COMPLETED = UpstreamState(
    JobStatus.COMPLETED, Source.WEBHOOK, upstream_task_id="t-1", image_urls=("https://c/1.png",)
)
FAILED = UpstreamState(JobStatus.FAILED, Source.WEBHOOK, upstream_task_id="t-1")
CANCELLED = UpstreamState(JobStatus.CANCELLED, Source.CANCEL, error_message="by request")
TIMED_OUT = UpstreamState(
    JobStatus.FAILED, Source.SWEEP, error_code=ErrorCode.TIMEOUT, error_message="deadline"
)

# (case, settings, job columns, how it ends, work left?)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], UpstreamState, bool]] = [
    ("nothing", {"result_store": "off"}, {}, COMPLETED, False),
    ("failed, nothing", {"result_store": "off"}, {}, FAILED, False),
    (
        "notify_url",
        {"result_store": "off"},
        {"notify_url": "https://app.example/n"},
        COMPLETED,
        True,
    ),
    (
        "job's on-complete task",
        {"result_store": "off"},
        {"on_complete_task": "app.done"},
        FAILED,
        True,
    ),
    (
        "default on-complete task",
        {"result_store": "off", "on_complete_task": "app.done"},
        {},
        FAILED,
        True,
    ),
    ("archive the results", {}, {}, COMPLETED, True),
    ("archive on, but no result", {}, {}, FAILED, False),
    ("cancelled with a task upstream", {"result_store": "off"}, {}, CANCELLED, True),
    (
        "cancelled before any task",
        {"result_store": "off"},
        {"upstream_task_id": None},
        CANCELLED,
        False,
    ),
    ("timed out with a task upstream", {"result_store": "off"}, {}, TIMED_OUT, True),
]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize(
    ("settings", "columns", "end", "work_left"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_finalize_job_is_sent_exactly_when_work_is_left(
    request: pytest.FixtureRequest,
    configure: Configure,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
    settings: dict[str, Any],
    columns: dict[str, Any],
    end: UpstreamState,
    work_left: bool,
) -> None:
    request.getfixturevalue("pg_url" if backend == "postgres" else "sqlite_url")
    configured = configure(**settings)
    ended: list[TerminalJob] = []
    sent: list[uuid.UUID] = []
    # The real consumer, whose message is recorded here instead of published.
    monkeypatch.setattr(celery_app, "send_finalize", lambda job_id, _provider: sent.append(job_id))
    rt = Runtime.build(configured, consumers=[ended.append, celery_app.finalize_after_commit])
    try:
        job_id = insert_job(**columns)
        with rt.session() as session:
            job = jobs.lock_job(session, job_id)
            assert job is not None
            assert jobs.apply_update(session, job, end).became_terminal
    finally:
        rt.close()

    assert [job.job_id for job in ended] == [job_id]
    assert ended[0].finalized is not work_left
    assert sent == ([job_id] if work_left else [])
    finalized_at = row(job_id).finalized_at
    assert (finalized_at is None) is work_left
