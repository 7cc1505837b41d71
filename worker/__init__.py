"""variflow: reliable image-variation jobs against paid upstream providers.

``from worker import submit_variation, get_job, cancel_job, wait, list_jobs``
loads the in-process API on first use: importing a small module of the
package (``worker.states``) does not bring in the database, Celery or HTTP.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.api import JobInfo, cancel_job, get_job, list_jobs, submit_variation, wait
    from worker.errors import InvalidInput, JobNotFound, VariflowError
    from worker.status import JobStatus

_EXPORTS = {
    "JobInfo": "worker.api",
    "cancel_job": "worker.api",
    "get_job": "worker.api",
    "list_jobs": "worker.api",
    "submit_variation": "worker.api",
    "wait": "worker.api",
    "InvalidInput": "worker.errors",
    "JobNotFound": "worker.errors",
    "VariflowError": "worker.errors",
    "JobStatus": "worker.status",
}

__all__ = [
    "InvalidInput",
    "JobInfo",
    "JobNotFound",
    "JobStatus",
    "VariflowError",
    "cancel_job",
    "get_job",
    "list_jobs",
    "submit_variation",
    "wait",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'worker' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
