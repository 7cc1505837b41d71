"""variflow's runtime in the bench's own process, on a throwaway PostgreSQL database
and a Redis queue of its own — both gone at the end, whatever happens."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from _db import create_database, drop_database

from worker import runtime as runtimes
from worker.celery_app import app as celery
from worker.celery_app import build_runtime, reconfigure
from worker.config import load_settings
from worker.migrate import upgrade
from worker.runtime import Runtime

ADMIN_URL = os.environ.get(
    "VARIFLOW_BENCH_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("VARIFLOW_BENCH_BROKER_URL", "redis://127.0.0.1:6379/0")


@contextmanager
def in_process(name: str, env: Mapping[str, str] = {}) -> Iterator[tuple[str, Runtime]]:
    """The database URL and the installed runtime; ``env``: more VARIFLOW_* settings."""
    name = f"{name}_{os.getpid()}"
    url = create_database(ADMIN_URL, name).render_as_string(hide_password=False)
    os.environ.update(
        {
            "VARIFLOW_HOME": tempfile.mkdtemp(prefix=f"{name}-"),
            "VARIFLOW_DATABASE_URL": url,
            "VARIFLOW_BROKER_URL": REDIS_URL,
            "VARIFLOW_QUEUE": name,
            "VARIFLOW_LOG_LEVEL": "WARNING",
            **env,
        }
    )
    try:
        upgrade(url)
        settings = load_settings()
        rt = runtimes.install(build_runtime(settings))
        reconfigure(settings)
        yield url, rt
    finally:
        runtimes.uninstall()
        with celery.connection_for_write() as conn:
            conn.default_channel.queue_delete(name)
        drop_database(ADMIN_URL, name)
