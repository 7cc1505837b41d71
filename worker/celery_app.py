"""The Celery app, its settings and the beat schedule; nothing else.

Configuration is applied lazily (``add_defaults`` with a callable), so
importing this module never reads the environment.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import setup_logging, task_postrun, task_prerun
from kombu import pools as kombu_pools

import worker.metrics  # noqa: F401 (connects worker_process_shutdown for metrics)
from worker.config import Settings, get_settings
from worker.logs import bind, configure_logging, unbind


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
        # A hung create call is killed before its submit claim expires, so an
        # expired claim always means the worker is gone.
        "task_soft_time_limit": max(1.0, settings.submit_claim_ttl - 30),
        "task_time_limit": max(2.0, settings.submit_claim_ttl - 10),
        "worker_hijack_root_logger": False,
        "beat_schedule_filename": str(settings.home.resolve() / "celerybeat-schedule"),
        "beat_schedule": {
            # expires: a tick nobody ran in time is dropped, not piled up.
            "poll-due": {
                "task": "variflow.poll_due",
                "schedule": settings.poll_interval,
                "options": {"expires": settings.poll_interval * 5},
            },
            "sweep": {
                "task": "variflow.sweep",
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


app = Celery("variflow", set_as_current=False)
app.add_defaults(lambda: celery_config(get_settings()))
app.autodiscover_tasks(["worker"], related_name="tasks", force=False)


@setup_logging.connect
def _setup_logging(**_: Any) -> None:
    # Connected, so Celery leaves logging to us: one format for every process.
    configure_logging(get_settings())


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


JOB_TASKS = {"variflow.submit_job", "variflow.finalize_job", "variflow.cancel_upstream"}
BATCH_TASKS = {"variflow.poll_batch"}
_tokens: dict[str, Any] = {}


def reconfigure() -> None:
    """Apply the current settings to an app that was already configured (tests, CLI)."""
    app.conf.update(celery_config(get_settings()))
    # Drop every cached connection and producer pool: the next send connects
    # to the (possibly new) broker.
    kombu_pools.reset()  # type: ignore[no-untyped-call]
    app._pool = None
    app.amqp._producer_pool = None
