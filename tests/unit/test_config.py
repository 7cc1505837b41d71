"""Settings (worker/config.py): embedded defaults, errors naming the variable, lazy loading."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from worker.config import (
    KNOWN_PROVIDERS,
    ConfigError,
    Settings,
    get_settings,
    load_settings,
    reset_settings,
)

ROOT = Path(__file__).resolve().parents[2]
Configure = Callable[..., Settings]


# --- embedded defaults ------------------------------------------------------------------


def test_defaults_need_no_server(tmp_path: Path) -> None:
    settings = load_settings()
    home = (tmp_path / "home").resolve()  # VARIFLOW_HOME, set by conftest
    assert settings.home.resolve() == home
    assert settings.database_url == f"sqlite:///{home / 'variflow.db'}"
    assert settings.broker_url == "filesystem://"
    assert settings.uses_filesystem_broker
    assert settings.broker_folder == home / "broker"
    assert settings.public_base == "http://127.0.0.1:8000"
    assert settings.port == 8000
    assert settings.providers == KNOWN_PROVIDERS
    for provider in KNOWN_PROVIDERS:
        assert settings.api_key(provider) is None
    assert settings.webhook_secret("piapi") is None
    assert settings.base_url("piapi") == "https://api.piapi.ai"
    assert settings.base_url("piclaza") == "https://api.piclaza.com"
    assert settings.base_url("lemondata") == "https://api.lemondata.cc"


def test_relative_home_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VARIFLOW_HOME", "state")
    settings = load_settings()
    assert settings.database_url == f"sqlite:///{(tmp_path / 'state').resolve() / 'variflow.db'}"
    assert settings.broker_folder == (tmp_path / "state").resolve() / "broker"


def test_public_url_follows_the_port(configure: Configure) -> None:
    assert configure(port=9123).public_base == "http://127.0.0.1:9123"


def test_explicit_values_win(configure: Configure) -> None:
    settings = configure(
        database_url="postgresql+psycopg://u@db.test/v",
        broker_url="redis://redis.test:6379/0",
        public_url="https://hooks.example.test/base/",
        providers=" PiAPI , piclaza ,",
        piapi_base_url="https://sandbox.test/piapi/",
    )
    assert settings.database_url == "postgresql+psycopg://u@db.test/v"
    assert settings.broker_url == "redis://redis.test:6379/0"
    assert not settings.uses_filesystem_broker
    assert settings.public_base == "https://hooks.example.test/base"
    assert settings.providers == ("piapi", "piclaza")
    assert settings.base_url("piapi") == "https://sandbox.test/piapi"


def test_secrets_are_readable_but_never_shown(configure: Configure) -> None:
    settings = configure(piapi_api_key="sk-live-123", piapi_webhook_secret="hook-456")
    assert settings.api_key("piapi") == "sk-live-123"
    assert settings.webhook_secret("piapi") == "hook-456"
    assert settings.webhook_secret("lemondata") is None  # no global secret for it
    for text in (repr(settings), str(settings)):
        assert "sk-live-123" not in text
        assert "hook-456" not in text


def test_settings_are_loaded_once_and_reset_on_demand(monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_settings()
    assert get_settings() is first
    monkeypatch.setenv("VARIFLOW_PORT", "8123")
    assert get_settings().port == 8000  # not re-read behind the process's back
    reset_settings()
    assert get_settings().port == 8123


def test_settings_are_frozen() -> None:
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError for frozen models
        get_settings().port = 1  # type: ignore[misc]


# --- bad values name the variable -------------------------------------------------------

BAD = [
    ("PUBLIC_URL", "not a url"),
    ("PUBLIC_URL", "ftp://hooks.test"),
    ("PUBLIC_URL", "hooks.example.test"),
    ("PROVIDERS", "foo"),
    ("PROVIDERS", "piapi,foo"),
    ("PROVIDERS", ","),
    ("PORT", "abc"),
    ("PORT", "0"),
    ("PORT", "70000"),
    ("DATABASE_URL", "var/variflow.db"),
    ("DATABASE_URL", "localhost:5432/variflow"),
    ("BROKER_URL", "localhost:6379"),
    ("PIAPI_BASE_URL", "api.piapi.ai"),
    ("HTTP_TIMEOUT", "-1"),
    ("LEMONDATA_CREATE_TIMEOUT", "60"),
    ("LOG_FORMAT", "xml"),
]


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_bad_value_raises_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(f"VARIFLOW_{name}", value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert f"VARIFLOW_{name}" in str(info.value)
    reset_settings()
    with pytest.raises(ConfigError, match=f"VARIFLOW_{name}"):
        get_settings()


def test_every_bad_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VARIFLOW_PORT", "abc")
    monkeypatch.setenv("VARIFLOW_PROVIDERS", "foo")
    monkeypatch.setenv("VARIFLOW_DATABASE_URL", "nowhere")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    for name in ("VARIFLOW_PORT", "VARIFLOW_PROVIDERS", "VARIFLOW_DATABASE_URL"):
        assert name in message


def test_config_error_is_a_clean_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VARIFLOW_PORT", "abc")
    with pytest.raises(ConfigError) as info:
        load_settings()
    error = info.value
    assert isinstance(error, RuntimeError)
    assert error.__cause__ is None and error.__suppress_context__  # raised `from None`


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_URL", "postgresql+psycopg:/variflow:hunter2-db-pass@db.test/variflow"),
        ("BROKER_URL", "redis:/:hunter2-db-pass@redis.test:6379/0"),
    ],
)
def test_config_error_does_not_echo_credentials(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    # A mistyped URL (one slash) still carries the password; the error that
    # start-up prints and logs must name the variable, not repeat its secret.
    monkeypatch.setenv(f"VARIFLOW_{name}", value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert f"VARIFLOW_{name}" in message
    assert "hunter2-db-pass" not in message


# --- settings are not read at import ----------------------------------------------------

IMPORT_SCRIPT = """
import worker, worker.api, worker.celery_app, worker.db, worker.jobs, worker.providers
import worker.tasks
import webhooks, webhooks.health, webhooks.receiver
from worker.config import ConfigError, get_settings
try:
    get_settings()
except ConfigError as exc:
    print("CONFIG-ERROR", exc)
else:
    print("LOADED")
"""


def test_importing_does_not_read_settings(tmp_path: Path) -> None:
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if not k.startswith("VARIFLOW_")}
    home = tmp_path / "import-home"
    env.update(VARIFLOW_HOME=str(home), VARIFLOW_PUBLIC_URL="not a url")
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_SCRIPT],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # The bad value is really bad: it only fails when settings are first used.
    assert "CONFIG-ERROR" in done.stdout, done.stdout + done.stderr
    assert "VARIFLOW_PUBLIC_URL" in done.stdout
    assert not home.exists()  # importing created nothing either


# --- provider capacity: staged jobs --------------------------------------------------


def test_max_staged_is_for_providers_that_queue_beyond_their_slots(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VARIFLOW_PIAPI_MAX_IN_FLIGHT", "3")
    monkeypatch.setenv("VARIFLOW_PIAPI_MAX_STAGED", "1")
    (piapi,) = load_settings().accounts("piapi")
    assert (piapi.limits.max_in_flight, piapi.limits.max_staged) == (3, 1)

    monkeypatch.setenv("VARIFLOW_PICLAZA_MAX_IN_FLIGHT", "5")
    monkeypatch.setenv("VARIFLOW_PICLAZA_MAX_STAGED", "1")
    with pytest.raises(ConfigError, match=r"piclaza/main: max_staged .* piclaza refuses them"):
        load_settings()


def test_max_staged_needs_slots_to_stage_beyond(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VARIFLOW_PIAPI_MAX_STAGED", "2")
    with pytest.raises(ConfigError, match=r"piapi\.max_staged: needs max_in_flight"):
        load_settings()
