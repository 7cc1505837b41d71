"""Transient upstream errors are retried with backoff; permanent ones fail the job clearly.

One stack serves the module (tests/e2e/conftest.py's ``shared_stack``): each test makes
its own job and looks only at it and its upstream tasks.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import RunningStack
from worker.api import get_job, submit_variation

pytestmark = pytest.mark.e2e
PIAPI = {"origin_task_id": "imagine-5", "index": "high_variation", "prompt": "a grey whale"}


@pytest.fixture
def running_stack(on_shared_stack: RunningStack) -> RunningStack:
    """The module's stack, this test on it."""
    return on_shared_stack


def _retries(job_id: object) -> int:
    return sum("retrying in" in (e.message or "") for e in get_job(job_id).events)  # type: ignore[arg-type]


@pytest.mark.parametrize("stack_backend", ["postgres"], indirect=True)
def test_transient_errors_are_retried_until_the_provider_answers(
    running_stack: RunningStack,
) -> None:
    sandbox = running_stack.sandbox.state
    sandbox.update_config(transient_error_rate=1.0)
    job = submit_variation("piapi", **PIAPI)
    running_stack.wait_for(lambda: _retries(job.id) >= 2, what="two retried submits")
    sandbox.update_config(transient_error_rate=0.0)

    done = running_stack.wait_terminal(job.id)

    assert done.status == "completed", done.error_message
    assert len(sandbox.tasks_by_correlation(str(job.id), "piapi")) == 1  # created once


@pytest.mark.parametrize("stack_backend", ["postgres"], indirect=True)
def test_a_refused_request_fails_the_job_with_the_providers_message(
    running_stack: RunningStack,
) -> None:
    running_stack.sandbox.state.update_config(api_keys=["someone-elses-key"])
    job = submit_variation("piapi", **PIAPI)

    done = running_stack.wait_terminal(job.id)

    assert done.status == "failed"
    assert done.error_code == "upstream_rejected"
    assert "HTTP 401" in (done.error_message or "")
    assert _retries(job.id) == 0
