"""Celery tasks. Thin: parse ids, call a flow, decide retry; nothing else.

Tasks take job ids, never objects, and may run more than once (acks_late):
each flow re-reads the database and does nothing when there is nothing to do.
The runtime they run with is the worker process's (worker/celery_app.py).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from worker import celery_app as queue
from worker.celery_app import app, worker_runtime
from worker.db import DB_UNAVAILABLE
from worker.finalize import finalize, stop_upstream_task
from worker.polling import lease_due, poll_jobs
from worker.submit import submit, wake_for_room
from worker.sweep import sweep

log = logging.getLogger(__name__)

# Bounded: one poll_due run never loops longer than a few leases' worth of work.
MAX_LEASES_PER_RUN = 50


# A database that is restarting: the task runs again later instead of being dropped.
RETRY_WHILE_DB_DOWN = {
    "autoretry_for": DB_UNAVAILABLE,
    "retry_backoff": 2,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": None,
}


@app.task(name=queue.SUBMIT_JOB, bind=True, **RETRY_WHILE_DB_DOWN)
def submit_job(
    self: Any, job_id: str, provider: str = "", carried: dict[str, Any] | None = None
) -> None:
    """Create the job's task upstream, exactly once per claim (worker/submit.py)."""
    outcome = submit(
        uuid.UUID(job_id),
        worker_runtime(),
        carried=carried,
        held_retries=self.request.retries,
        provider=provider,
        wake=lambda ids: [queue.send_submit(i, provider) for i in ids],
    )
    if outcome.poll_in is not None:
        try:
            queue.send_first_poll(uuid.UUID(job_id), provider, outcome.poll_in)
        except Exception as exc:  # beat's next tick leases the job as any other
            log.warning("job %s: could not send its first poll (%s)", job_id, exc)
    if outcome.orphan:
        try:
            queue.send_cancel_upstream(uuid.UUID(job_id), provider, outcome.orphan)
        except Exception:  # the job's own answer is written; this is best effort
            log.exception("job %s: could not send the cancel of task %s", job_id, outcome.orphan)
    if outcome.retry_in is not None:
        kwargs = {"provider": provider, "carried": outcome.carry}
        raise self.retry(countdown=outcome.retry_in, kwargs=kwargs)


# Own time limits: downloads for the archive may outlast the submit-sized defaults.
@app.task(
    name=queue.FINALIZE_JOB, bind=True, soft_time_limit=900, time_limit=960, **RETRY_WHILE_DB_DOWN
)
def finalize_job(self: Any, job_id: str, provider: str = "") -> None:
    """A job ended: stop an unwanted upstream task, archive, tell the application."""
    retry_in = finalize(
        uuid.UUID(job_id), worker_runtime(), queue.send_application_task, self.request.retries
    )
    if retry_in is not None:
        raise self.retry(countdown=retry_in)


@app.task(name=queue.POLL_DUE)
def poll_due() -> int:
    """Beat, every VARIFLOW_POLL_INTERVAL: lease due jobs and hand them to poll tasks."""
    runtime = worker_runtime()
    sent = 0
    for _ in range(MAX_LEASES_PER_RUN):
        batches = lease_due(runtime)
        for batch in batches:
            queue.send_poll_batch(batch.provider, batch.job_ids, runtime.settings.poll_lease)
        sent += sum(len(b.job_ids) for b in batches)
        if not batches:
            break
    return sent


@app.task(name=queue.POLL_BATCH, **RETRY_WHILE_DB_DOWN)
def poll_batch(provider: str, job_ids: list[str], lease_first: bool = False) -> None:
    """Poll a leased batch of one provider's jobs; safe to run twice (the lease moved on).
    ``lease_first``: a job's first poll, sent with its submission: leased here."""
    poll_jobs(provider, [uuid.UUID(i) for i in job_ids], worker_runtime(), lease_first=lease_first)


@app.task(name=queue.SWEEP)
def sweep_jobs() -> dict[str, int]:
    """Beat, every VARIFLOW_SWEEP_INTERVAL: re-send lost jobs, release dead claims,
    fail overdue jobs, offer unfinished after-the-end work again."""
    report = sweep(worker_runtime())
    for job_id in report.to_submit:
        queue.send_submit(job_id, report.providers.get(job_id, ""))
    for job_id in report.refinalize:
        queue.send_finalize(job_id)
    counts = {k: len(v) for k, v in vars(report).items() if k != "providers"}
    if any(counts.values()):
        log.info("sweep: %s", counts)
    return counts


@app.task(name=queue.WAKE_WAITING, **RETRY_WHILE_DB_DOWN)
def wake_waiting(provider: str, count: int = 1) -> int:
    """Wake the jobs waiting for a provider's capacity that have room now. A job's end
    does this in the process that saw it (celery_app.wake_after_end); the task stays for
    messages an earlier version sent (``count``, their hint, is no longer needed)."""
    woken = wake_for_room(provider, worker_runtime())
    for job_id in woken:
        queue.send_submit(job_id, provider)
    return len(woken)


@app.task(name=queue.CANCEL_UPSTREAM, **RETRY_WHILE_DB_DOWN)
def cancel_upstream(job_id: str, provider: str = "", upstream_task_id: str | None = None) -> None:
    """Best effort: ask the provider to stop a task the job does not follow (an orphan)."""
    stop_upstream_task(uuid.UUID(job_id), worker_runtime(), upstream_task_id)
