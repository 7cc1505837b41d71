"""A PiAPI job through the whole product: API -> Celery -> sandbox -> webhook -> completed.

One stack per backend serves the module (tests/e2e/conftest.py's ``shared_stack``): each
test makes its own job and looks only at it and its upstream task.
"""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.conftest import RunningStack
from worker.api import JobInfo, get_job, submit_variation

pytestmark = pytest.mark.e2e


@pytest.fixture
def running_stack(on_shared_stack: RunningStack) -> RunningStack:
    """The module's stack (one per backend), this test on it."""
    return on_shared_stack


def _statuses(job_id: object) -> list[str]:
    return [e.to_status for e in get_job(job_id).events if e.kind == "transition"]  # type: ignore[arg-type, misc]


def test_piapi_job_completes_through_webhooks(running_stack: RunningStack) -> None:
    job = submit_variation("piapi", origin_task_id="imagine-1", index="2", prompt="a red fox")
    assert job.status == "queued"

    done = running_stack.wait_terminal(job.id)

    assert done.status == "completed", done.error_message
    assert done.upstream_task_id
    assert len(done.result_urls) == 4
    for url in done.result_urls:
        image = httpx.get(url, timeout=10)
        assert image.status_code == 200
        assert image.content.startswith(b"\x89PNG")
    assert _statuses(job.id) == ["queued", "submitted", "processing", "completed"]
    sources = {e.source for e in done.events if e.kind == "transition" and e.to_status != "queued"}
    assert "webhook" in sources
    assert done.submitted_at and done.completed_at
    assert str(job.id) not in running_stack.sandbox.state.stats()["duplicate_creates"]


def test_duplicated_and_reordered_webhooks_leave_it_completed(
    running_stack: RunningStack,
) -> None:
    running_stack.sandbox.state.update_config(webhook_duplicate_rate=1.0, webhook_reorder=True)
    job = submit_variation("piapi", origin_task_id="imagine-2", index="1", prompt="a blue owl")

    running_stack.wait_for(
        lambda: succeeded_deliveries(running_stack, str(job.id)) >= 6,
        what="every duplicated delivery to be answered",
    )
    done = get_job(job.id)
    assert done.status == "completed", done.error_message
    assert len(done.result_urls) == 4
    ignored = [e for e in done.events if e.kind == "ignored"]
    assert ignored, "duplicates and stale deliveries are recorded as ignored events"
    assert all(e.to_status in {"submitted", "processing", "completed"} for e in ignored)


def test_wrong_secret_changes_nothing(running_stack: RunningStack) -> None:
    # Long enough in processing for the forged "failed" to arrive mid-flight.
    running_stack.sandbox.state.update_config(processing_seconds=3.0)
    job = submit_variation("piapi", origin_task_id="imagine-3", index="3", prompt="a green frog")
    running_stack.wait_for(
        lambda: quiet_in_processing(get_job(job.id)),
        what="processing, with the create's answer written",
    )
    before = get_job(job.id)

    forged = httpx.post(
        f"{running_stack.web_url}/webhooks/piapi/{job.id}",
        json={"timestamp": 1, "data": {"task_id": before.upstream_task_id, "status": "failed"}},
        headers={"x-webhook-secret": "not-the-secret"},
        timeout=10,
    )

    assert forged.status_code == 401
    assert get_job(job.id) == before
    done = running_stack.wait_terminal(job.id)
    assert done.status == "completed"


def succeeded_deliveries(running_stack: RunningStack, correlation: str) -> int:
    """Webhook deliveries the web app answered with a 2xx for the job's upstream task."""
    sandbox = running_stack.sandbox.state
    task = sandbox.task_by_correlation(correlation)
    if task is None:
        return 0
    return sum(a.ok for a in sandbox.webhook_attempts() if a.task_id == task.task_id)


def quiet_in_processing(job: JobInfo) -> bool:
    # Webhooks may bring the job to processing before the worker writes the create's
    # own answer (an event of its own): only then does nothing legitimate change it.
    answered = any(e.source == "submit" and e.kind != "info" for e in job.events)
    return job.status == "processing" and answered
