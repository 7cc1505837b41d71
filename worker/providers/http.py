"""The HTTP client adapters talk through: explicit timeouts, no redirects."""

from __future__ import annotations

import httpx


def make_client(timeout: float, connect_timeout: float) -> httpx.Client:
    """One per process (a forked Celery child makes its own: sockets do not cross a fork)."""
    return httpx.Client(
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        limits=httpx.Limits(max_connections=50, max_keepalive_connections=20),
        headers={"User-Agent": "variflow/0.1"},
        follow_redirects=False,
    )
