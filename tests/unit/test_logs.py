"""Log lines written during a task carry its job id and provider, as text or JSON."""

from __future__ import annotations

import io
import json
import logging

from celery.signals import task_postrun, task_prerun

from tests.conftest import Configure
from worker.logs import ContextFilter, JsonFormatter, TextFormatter
from worker.tasks import poll_batch, submit_job

JOB = "0b6f1f3e-1111-4222-8333-944445555666"


def _capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter())
    logger = logging.getLogger(f"test-logs-{id(stream)}")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, stream


def _run_as_task(task: object, args: list[object], kwargs: dict[str, object], emit: object) -> None:
    """Fire Celery's real prerun/postrun signals around ``emit`` (what a worker does)."""
    task_prerun.send(sender=task, task_id="t-1", task=task, args=args, kwargs=kwargs)
    try:
        emit()  # type: ignore[operator]
    finally:
        task_postrun.send(sender=task, task_id="t-1", task=task, args=args, kwargs=kwargs)


def test_json_lines_during_a_task_carry_job_id_and_provider(configure: Configure) -> None:
    configure(log_format="json")
    logger, stream = _capture(JsonFormatter())

    _run_as_task(
        submit_job,
        [JOB],
        {"provider": "piapi"},
        lambda: logger.info("calling the provider"),
    )
    logger.info("after the task")

    during, after = (json.loads(line) for line in stream.getvalue().splitlines())
    assert during["message"] == "calling the provider"
    assert during["job_id"] == JOB
    assert during["provider"] == "piapi"
    assert during["task"] == "variflow.submit_job"
    assert "job_id" not in after and "provider" not in after


def test_poll_batches_name_their_provider(configure: Configure) -> None:
    logger, stream = _capture(TextFormatter("%(message)s"))

    _run_as_task(poll_batch, ["piclaza", [JOB]], {}, lambda: logger.warning("poll failed"))

    line = stream.getvalue().strip()
    assert line.startswith("poll failed [")
    assert "provider=piclaza" in line
    assert "task=variflow.poll_batch" in line


def test_explicit_extra_wins_over_the_bound_context(configure: Configure) -> None:
    logger, stream = _capture(JsonFormatter())

    _run_as_task(
        submit_job,
        [JOB],
        {"provider": "piapi"},
        lambda: logger.info("other job", extra={"job_id": "explicit"}),
    )

    assert json.loads(stream.getvalue())["job_id"] == "explicit"
