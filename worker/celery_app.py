"""The Celery app: its settings, its beat schedule, the messages variflow sends, and the
wiring of a worker process.

Importing this module reads no settings: configuration is applied lazily
(``add_defaults`` with a callable) from the settings of the process's runtime.
The app names its task module (``include``) instead of importing it, so that a
process that only *sends* (the web app, an application calling the API) never
loads the task code; messages are sent by task name.

What a worker process runs besides its tasks is connected here, in one place:
logging, the task context of log lines, the process's runtime (built once per
prefork child, from settings read once) with its consumers of "a job ended",
the worker's own metrics (its scope of samples and its /metrics endpoint, in the
main process) and the metrics bookkeeping of exiting children.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery
from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
)
from kombu import pools as kombu_pools

from worker import capacity, metrics, runtime
from worker.config import Settings, get_settings
from worker.hooks import Consumer
from worker.logs import bind, configure_logging, unbind
from worker.runtime import Runtime
from worker.status import TerminalJob
from worker.submit import wake_for_room

log = logging.getLogger(__name__)

# Task names: the contract between senders and the worker (worker/tasks.py).
SUBMIT_JOB = "variflow.submit_job"
FINALIZE_JOB = "variflow.finalize_job"
CANCEL_UPSTREAM = "variflow.cancel_upstream"
POLL_DUE = "variflow.poll_due"
POLL_BATCH = "variflow.poll_batch"
SWEEP = "variflow.sweep"
WAKE_WAITING = "variflow.wake_waiting"
JOB_TASKS = {SUBMIT_JOB, FINALIZE_JOB, CANCEL_UPSTREAM}
BATCH_TASKS = {POLL_BATCH}


def celery_config(settings: Settings) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_default_queue": settings.queue,
        # Tasks run at least once: a message is acknowledged only after the task
        # returns, and a worker killed mid-task gives it back to the queue.
        # Every task is idempotent, so a second run is harmless.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Room for the longest provider call (claims are kept alive by a
        # heartbeat meanwhile); a hung call is interrupted after that, and its
        # outcome treated as unknown.
        # Room for fetching the input (30 s), the longest call and a minute of
        # retrying the write of its answer (worker/submit.py), with a margin.
        "task_soft_time_limit": settings.longest_call + 150,
        "task_time_limit": settings.longest_call + 180,
        "worker_hijack_root_logger": False,
        # Any number of beats, one sending (a lease in the database); named, not
        # imported, so that only beat loads it. It keeps no schedule file.
        "beat_scheduler": "worker.beat_scheduler:BeatScheduler",
        "beat_schedule": {
            # expires: a tick nobody ran in time is dropped, not piled up.
            "poll-due": {
                "task": POLL_DUE,
                "schedule": settings.poll_interval,
                "options": {"expires": settings.poll_interval * 5},
            },
            "sweep": {
                "task": SWEEP,
                "schedule": settings.sweep_interval,
                "options": {"expires": settings.sweep_interval},
            },
        },
    }
    if settings.uses_filesystem_broker:
        # Kombu's filesystem transport needs the folder before the first send.
        settings.broker_folder.mkdir(parents=True, exist_ok=True)
        folder = str(settings.broker_folder)
        conf["broker_transport_options"] = {
            "data_folder_in": folder,
            "data_folder_out": folder,
            # Kombu's default is ./control, relative to wherever a process runs.
            "control_folder": str(settings.broker_folder / "control"),
            "store_processed": False,
        }
    else:
        conf["broker_transport_options"] = {
            # Redis redelivers an unacknowledged message after this long. It must
            # exceed the longest task run and the longest retry countdown (ETA
            # messages count too), or healthy tasks would be delivered twice.
            "visibility_timeout": 3600,
            "socket_connect_timeout": 3,
            "socket_timeout": 10,
        }
        conf["broker_connection_timeout"] = 3
    return conf


def _settings() -> Settings:
    # The settings of the process's runtime when an entry point installed one;
    # otherwise (the `celery` command itself) read once, here.
    installed = runtime.installed()
    return installed.settings if installed is not None else get_settings()


app = Celery("variflow", set_as_current=False, include=["worker.tasks"])
app.add_defaults(lambda: celery_config(_settings()))


def reconfigure(settings: Settings) -> None:
    """Apply ``settings`` to an app that was already configured (tests, CLI)."""
    app.conf.update(celery_config(settings))
    # Drop every cached connection and producer pool: the next send connects
    # to the (possibly new) broker.
    kombu_pools.reset()  # type: ignore[no-untyped-call]
    app._pool = None
    app.amqp._producer_pool = None


# --- the messages variflow sends -----------------------------------------------------------


def send_submit(job_id: uuid.UUID, provider: str) -> bool:
    """Nudge a worker to submit a job. The row is already committed, so a failed
    send loses nothing: the sweep re-sends queued jobs whose message was lost."""
    try:
        app.send_task(
            SUBMIT_JOB,
            args=(str(job_id),),
            kwargs={"provider": provider},
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception as exc:  # kombu/redis raise many types; none may lose the job
        log.warning(
            "job %s is queued but its submit message could not be sent (%s: %s); "
            "the sweep will send it again",
            job_id,
            type(exc).__name__,
            exc,
            extra={"job_id": str(job_id), "provider": provider},
        )
        return False
    return True


def send_finalize(job_id: uuid.UUID, provider: str = "") -> None:
    app.send_task(FINALIZE_JOB, args=(str(job_id),), kwargs={"provider": provider})


def send_cancel_upstream(job_id: uuid.UUID, provider: str, upstream_task_id: str) -> None:
    app.send_task(
        CANCEL_UPSTREAM,
        args=(str(job_id),),
        kwargs={"provider": provider, "upstream_task_id": upstream_task_id},
    )


def send_poll_batch(provider: str, job_ids: Sequence[uuid.UUID], expires: float) -> None:
    app.send_task(POLL_BATCH, args=(provider, [str(i) for i in job_ids]), expires=expires)


def send_first_poll(job_id: uuid.UUID, provider: str, countdown: float) -> None:
    """A just-submitted job's first poll, at the time its plan says (beat's tick would
    come up to a poll interval later); it leases the job itself (polling.poll_jobs)."""
    app.send_task(
        POLL_BATCH,
        args=(provider, [str(job_id)]),
        kwargs={"lease_first": True},
        countdown=countdown,
        expires=countdown + _settings().poll_lease,
    )


def send_application_task(name: str, args: list[str], kwargs: dict[str, str], queue: str) -> None:
    """The application's own task, sent when its job ends (finalize)."""
    app.send_task(name, args=args, kwargs=kwargs, queue=queue)


def finalize_after_commit(job: TerminalJob) -> None:
    """A consumer of "a job ended": send finalize_job (the sweep re-sends it if this fails)."""
    if job.finalized:
        return  # nothing was left to do after the end
    try:
        send_finalize(job.job_id, job.provider)
    except Exception as exc:
        log.warning(
            "job %s: could not send finalize_job (%s); the sweep will send it again",
            job.job_id,
            exc,
            extra={"job_id": str(job.job_id), "provider": job.provider},
        )


def wake_after_end(job: TerminalJob) -> None:
    """A consumer of "a job ended": its slot is free, so the jobs waiting for the
    provider's capacity that now have room go (only for providers with limits; the
    sweep also wakes). The queue head is read here and its submits sent at once, in
    whichever process saw the end (a webhook in web, a poll in a worker): a
    ``wake_waiting`` message between the two would add a queue hop to every slot's
    refill."""
    rt = runtime.installed()
    # Only a slot is freed by a job's end (rates, budgets, pauses and the breaker end
    # with time, on the waiting head's timer): without slot limits there is nothing to
    # wake, and the webhook path reads nothing more.
    if rt is None or not capacity.slot_limited(rt.providers.accounts(job.provider)):
        return
    try:
        woken = wake_for_room(job.provider, rt)
    except Exception as exc:  # the end is committed: the sweep wakes the queue later
        log.warning("could not wake %s's queue (%s); the sweep will", job.provider, exc)
        return
    for job_id in woken:
        send_submit(job_id, job.provider)


# The consumers of "a job ended" in every variflow process: finalize, wake, metrics.
TERMINAL_CONSUMERS: tuple[Consumer, ...] = (
    finalize_after_commit,
    wake_after_end,
    metrics.observe_terminal,
)


def build_runtime(settings: Settings) -> Runtime:
    """The runtime of a variflow process, with the consumers every process has."""
    return Runtime.build(settings, consumers=TERMINAL_CONSUMERS)


# --- the wiring of a worker process ------------------------------------------------------


def worker_runtime() -> Runtime:
    """The runtime tasks run with: installed on first use in this process (or child)."""
    return runtime.ensure(lambda: build_runtime(get_settings()))


@worker_init.connect
def _make_worker_folders(**_: Any) -> None:
    # A worker makes what it uses, at start and on any backend: the results folder
    # (inline images, archived copies; none for object storage) and the host's
    # metrics folder.
    settings = _settings()
    folders = [settings.metrics_folder]
    if settings.results_bucket is None:
        folders.append(settings.results_folder)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)


@worker_init.connect
def _start_worker_metrics(sender: Any = None, **_: Any) -> None:
    # The worker's main process, before it forks its pool: its own scope of samples
    # (emptied of earlier runs'), which its children inherit, and its own /metrics.
    settings = _settings()
    node = str(getattr(sender, "hostname", "") or "celery")  # sender: the WorkController
    scope = metrics.worker_scope(node)
    metrics.start_scope(settings.metrics_folder, scope, settings.provider_names)
    host, port = settings.worker_metrics_host, settings.worker_metrics_port
    if not port:
        return
    try:
        metrics.serve(host, port)
    except OSError as exc:
        # SystemExit, not an exception: Celery logs a signal handler's errors and goes on.
        raise SystemExit(
            f"variflow: cannot serve the worker's metrics on {host}:{port} "
            f"({exc.strerror or exc}): set VARIFLOW_WORKER_METRICS_PORT to a free port "
            "(each worker on a host needs its own; 0 turns it off) and "
            "VARIFLOW_WORKER_METRICS_HOST to an address of this host"
        ) from exc


@worker_process_init.connect
def _init_child(**_: Any) -> None:
    # A prefork child: engines and HTTP clients must not be shared with the parent.
    worker_runtime()


@setup_logging.connect
def _setup_logging(**_: Any) -> None:
    # Connected, so Celery leaves logging to us: one format for every process.
    configure_logging(_settings())


@task_prerun.connect
def _bind_task_context(
    task_id: str = "", task: Any = None, args: Any = None, kwargs: Any = None, **_: Any
) -> None:
    # Tasks take (job_id, provider=...) or (provider, job_ids): name both on every line.
    kwargs = kwargs or {}
    job_id = args[0] if args and task and task.name in JOB_TASKS else None
    batch = bool(args) and task is not None and task.name in BATCH_TASKS
    provider = kwargs.get("provider") or (args[0] if batch else "")
    token = bind(task=task.name if task else "", job_id=job_id or "", provider=provider or "")
    _tokens[task_id] = token


@task_postrun.connect
def _unbind_task_context(task_id: str = "", **_: Any) -> None:
    token = _tokens.pop(task_id, None)
    if token is not None:
        unbind(token)


_tokens: dict[str, Any] = {}

# A Celery prefork child is ending: drop its live-gauge metric files.
worker_process_shutdown.connect(metrics.on_worker_process_shutdown, weak=False)
