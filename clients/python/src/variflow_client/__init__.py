"""Python client of the variflow HTTP API (/v1): ``Client`` and ``AsyncClient``.

Usage is in the distribution's README.md; the API itself in variflow's docs/api.md.
"""

from variflow_client._async import AsyncClient, AsyncJobs
from variflow_client._client import Client, Jobs
from variflow_client._errors import (
    APIError,
    AuthenticationError,
    Conflict,
    InvalidInput,
    InvalidResponse,
    JobFailed,
    NetworkError,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    VariflowError,
    WaitTimeout,
)
from variflow_client._models import Event, Job, JobError, Result
from variflow_client._retry import RetryPolicy
from variflow_client._version import __version__

__all__ = [
    "APIError",
    "AsyncClient",
    "AsyncJobs",
    "AuthenticationError",
    "Client",
    "Conflict",
    "Event",
    "InvalidInput",
    "InvalidResponse",
    "Job",
    "JobError",
    "JobFailed",
    "Jobs",
    "NetworkError",
    "NotFound",
    "RateLimited",
    "Result",
    "RetryPolicy",
    "ServiceUnavailable",
    "VariflowError",
    "WaitTimeout",
    "__version__",
]
