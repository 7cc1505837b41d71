"""The one httpx.Client of a process, with explicit timeouts."""

from __future__ import annotations

import functools
import os

import httpx

from worker.config import get_settings


@functools.cache
def _client_for(pid: int) -> httpx.Client:
    settings = get_settings()
    return httpx.Client(
        timeout=httpx.Timeout(settings.http_timeout, connect=settings.http_connect_timeout),
        limits=httpx.Limits(max_connections=50, max_keepalive_connections=20),
        headers={"User-Agent": "variflow/0.1"},
        follow_redirects=False,
    )


def get_client() -> httpx.Client:
    # Keyed by pid: a forked Celery child must open its own connections.
    return _client_for(os.getpid())


def reset_client() -> None:
    _client_for.cache_clear()
