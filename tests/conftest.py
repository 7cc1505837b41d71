"""Shared fixtures: real PostgreSQL, Redis and RabbitMQ, the embedded SQLite default,
and settings.

PostgreSQL, Redis and RabbitMQ are found from VARIFLOW_TEST_DATABASE_URL,
VARIFLOW_TEST_REDIS_URL and VARIFLOW_TEST_RABBITMQ_URL. When one is unreachable
the tests that need it are skipped, unless VARIFLOW_REQUIRE_SERVICES=1 (CI),
which makes it a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import settings as hypothesis_settings
from kombu import Connection
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.s3_support import MotoServer, start_moto_server
from worker import runtime
from worker.celery_app import build_runtime
from worker.celery_app import reconfigure as reconfigure_celery
from worker.config import ConfigError, Settings, get_settings, load_settings
from worker.migrate import upgrade

PG_URL = os.environ.get(
    "VARIFLOW_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("VARIFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("VARIFLOW_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
REQUIRE_SERVICES = os.environ.get("VARIFLOW_REQUIRE_SERVICES") == "1"
SANDBOX_KEY = "sandbox-key"

# CI runs the property tests on a fixed sequence of examples, so that a run is
# repeatable; a developer's run explores new ones (and remembers failures).
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

# Variables a developer's shell may carry that must not leak into tests.
_ISOLATE = [name for name in os.environ if name.startswith("VARIFLOW_") and "TEST" not in name]


def unavailable(what: str, error: Exception) -> None:
    message = f"{what} unreachable: {type(error).__name__}: {error}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (VARIFLOW_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(message)


def use_environment() -> Settings | None:
    """Read the settings from the environment and make them this process's runtime,
    as an entry point does (None when the environment's settings are invalid)."""
    try:
        settings = load_settings()
    except ConfigError:  # tests of bad settings set them on purpose
        runtime.uninstall()
        return None
    runtime.install(build_runtime(settings))
    reconfigure_celery(settings)
    return settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in _ISOLATE:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VARIFLOW_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()  # the CLI's and the Celery app's fallback reads it once
    use_environment()
    yield
    runtime.uninstall()
    get_settings.cache_clear()


Configure = Callable[..., Settings]


def runtime_of(settings: Settings) -> runtime.Runtime:
    """The runtime ``configure`` installed for ``settings`` (what flows take)."""
    current = runtime.current()
    assert current.settings is settings, "configure() installs the runtime of its settings"
    return current


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Configure:
    """Set VARIFLOW_* variables (by lower-case field name) and reload settings."""

    def apply(**values: object) -> Settings:
        for name, value in values.items():
            monkeypatch.setenv(f"VARIFLOW_{name.upper()}", str(value))
        settings = use_environment()
        if settings is None:
            return load_settings()  # raises the ConfigError naming the variable
        return settings

    return apply


@pytest.fixture
def sqlite_url(tmp_path: Path, configure: Configure) -> str:
    """A migrated SQLite database in a temporary folder, made the current one."""
    url = f"sqlite:///{tmp_path / 'variflow.db'}"
    configure(database_url=url)
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session."""
    admin_url = make_url(PG_URL)
    name = f"variflow_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        unavailable(f"PostgreSQL at {admin_url.render_as_string(hide_password=True)}", exc)
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_url(pg_server_url: str, configure: Configure) -> str:
    """The session's PostgreSQL database, emptied, made the current one."""
    engine = create_engine(pg_server_url)
    with engine.begin() as conn:
        tables = "jobs, job_events, job_inputs, api_tokens, account_states"
        # A beat killed in one test must not leave the next one a live lease.
        tables += ", beat_leases, beat_entries"
        conn.execute(text(f"TRUNCATE {tables} CASCADE"))
    engine.dispose()
    configure(database_url=pg_server_url)
    return pg_server_url


@pytest.fixture(scope="session")
def redis_server_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:
        unavailable(f"Redis at {REDIS_URL}", exc)
    return REDIS_URL


@pytest.fixture
def redis_url(redis_server_url: str, configure: Configure) -> str:
    """Redis as the broker, on a queue of this test's own."""
    configure(broker_url=redis_server_url, queue=f"variflow-test-{uuid.uuid4().hex[:8]}")
    return redis_server_url


@pytest.fixture(scope="session")
def rabbitmq_server_url() -> str:
    try:
        with Connection(RABBITMQ_URL, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        unavailable(f"RabbitMQ at {Connection(RABBITMQ_URL).as_uri()}", exc)
    return RABBITMQ_URL


@pytest.fixture
def rabbitmq_url(rabbitmq_server_url: str, configure: Configure) -> Iterator[str]:
    """RabbitMQ as the broker, on a queue of this test's own (deleted afterwards:
    Celery declares it durable, so it would outlive the run)."""
    queue = f"variflow-test-{uuid.uuid4().hex[:8]}"
    configure(broker_url=rabbitmq_server_url, queue=queue)
    yield rabbitmq_server_url
    with Connection(rabbitmq_server_url, connect_timeout=2) as conn:
        channel = conn.default_channel
        channel.queue_delete(queue)
        channel.exchange_delete(queue)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    """An S3-compatible HTTP server (moto, tests/s3_support.py) for this test session;
    each test makes a bucket of its own."""
    with start_moto_server() as server:
        yield server
