"""A create call that times out after the provider acted on it is never sent twice.

One stack serves the module (tests/e2e/conftest.py's ``shared_stack``), its HTTP client
timeout shorter than the sandbox's slow answers: each test makes its own job and looks
only at it and its upstream tasks.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import RunningStack
from worker.api import get_job, submit_variation

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack_settings() -> dict[str, str]:
    # Shorter than the sandbox's slow answer: the create is sent, then times out.
    return {"VARIFLOW_HTTP_TIMEOUT": "1.0"}


@pytest.fixture
def running_stack(on_shared_stack: RunningStack) -> RunningStack:
    """The module's stack, this test on it."""
    return on_shared_stack


@pytest.mark.parametrize("stack_backend", ["postgres"], indirect=True)
def test_piapi_adopts_its_task_from_the_webhook_after_a_timed_out_create(
    running_stack: RunningStack,
) -> None:
    running_stack.sandbox.state.update_config(slow_rate=1.0, slow_seconds=3.0)
    job = submit_variation("piapi", origin_task_id="o-amb", index="1", prompt="a slow fox")

    done = running_stack.wait_terminal(job.id)

    assert done.status == "completed", done.error_message
    assert len(running_stack.sandbox.state.tasks_by_correlation(str(job.id), "piapi")) == 1
    # The create's answer never arrived: the task id came from the webhook.
    submitted = [e for e in done.events if e.kind == "transition" and e.to_status == "submitted"]
    assert [e.source for e in submitted] == ["webhook"]
    assert not any(e.source == "submit" and e.kind == "transition" for e in submitted)


@pytest.mark.parametrize("stack_backend", ["postgres"], indirect=True)
def test_piclaza_fails_clearly_instead_of_creating_twice(
    running_stack: RunningStack, image_url: str
) -> None:
    running_stack.sandbox.state.update_config(slow_rate=1.0, slow_seconds=3.0)
    job = submit_variation("piclaza", image=image_url)

    done = running_stack.wait_terminal(job.id)

    assert done.status == "failed"
    assert done.error_code == "submit_outcome_unknown"
    assert "not sent again" in (done.error_message or "")
    assert len(running_stack.sandbox.state.tasks_by_correlation(str(job.id), "piclaza")) == 1
    assert get_job(job.id).upstream_task_id is None
