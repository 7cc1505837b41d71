"""Sandbox knobs: defaults, environment variables, the /_sandbox control endpoints."""

from __future__ import annotations

import pytest

from sandbox.app import create_sandbox_app
from sandbox.config import SandboxConfig
from sandbox.context import EXTENSION_KEY
from sandbox.state import SandboxState


def test_defaults_match_the_documented_knobs() -> None:
    config = SandboxConfig()
    assert config.api_keys == ["sandbox-key"]
    assert config.pending_seconds == 0.3
    assert config.processing_seconds == 0.6
    assert config.fail_rate == 0.0
    assert config.transient_error_codes == [429, 500, 502, 503]
    assert config.retry_after_seconds == 1
    assert config.webhook_retry_attempts == 5
    assert config.webhook_retry_base_seconds == 0.2
    assert config.lemondata_mode == "sync"
    assert config.lemondata_max_image_bytes == 4 * 1024 * 1024
    assert config.seed is None
    assert config.rate_limit_all is False
    # Capacity: unlimited unless configured.
    assert config.piapi_max_concurrent == {}
    assert config.piapi_daily_failed_allowance == {}
    assert config.piclaza_max_concurrent == {}
    assert config.lemondata_requests_per_minute == {}


def test_from_env_parses_every_kind_of_value() -> None:
    config = SandboxConfig.from_env(
        {
            "VARIFLOW_SANDBOX_PENDING_SECONDS": "0.5",
            "VARIFLOW_SANDBOX_API_KEYS": "a, b",
            "VARIFLOW_SANDBOX_TRANSIENT_ERROR_CODES": "[503, 429]",
            "VARIFLOW_SANDBOX_WEBHOOK_REORDER": "yes",
            "VARIFLOW_SANDBOX_SEED": "7",
            "VARIFLOW_SANDBOX_LEMONDATA_MODE": "async",
            "UNRELATED": "x",
        }
    )
    assert config.pending_seconds == 0.5
    assert config.api_keys == ["a", "b"]
    assert config.transient_error_codes == [503, 429]
    assert config.webhook_reorder is True
    assert config.seed == 7
    assert config.lemondata_mode == "async"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("VARIFLOW_SANDBOX_PENDING_SECONDS", "soon"),
        ("VARIFLOW_SANDBOX_FAIL_RATE", "1.5"),
        ("VARIFLOW_SANDBOX_WEBHOOK_REORDER", "maybe"),
        ("VARIFLOW_SANDBOX_LEMONDATA_MODE", "batch"),
        ("VARIFLOW_SANDBOX_TRANSIENT_ERROR_CODES", "200"),
        ("VARIFLOW_SANDBOX_PIAPI_MAX_CONCURRENT", "0"),
        ("VARIFLOW_SANDBOX_PICLAZA_MAX_CONCURRENT", "key=many"),
        ("VARIFLOW_SANDBOX_PIAPI_DAILY_FAILED_ALLOWANCE", "-1"),
        ("VARIFLOW_SANDBOX_LEMONDATA_REQUESTS_PER_MINUTE", "[1000]"),
    ],
)
def test_from_env_rejects_bad_values_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ValueError, match=variable):
        SandboxConfig.from_env({variable: value})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("3", {"*": 3}),
        ("sandbox-key=3, big-key=12", {"sandbox-key": 3, "big-key": 12}),
        ('{"*": 3, "big-key": 12}', {"*": 3, "big-key": 12}),
    ],
)
def test_per_key_limits_read_from_env(text: str, expected: dict[str, int]) -> None:
    config = SandboxConfig.from_env({"VARIFLOW_SANDBOX_PIAPI_MAX_CONCURRENT": text})
    assert config.piapi_max_concurrent == expected


def test_a_daily_allowance_of_zero_is_allowed() -> None:
    assert SandboxConfig(piapi_daily_failed_allowance=0).piapi_daily_failed_allowance == {"*": 0}


def test_constructor_rejects_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="webhook_drop_rate"):
        SandboxConfig(webhook_drop_rate=-0.1)


def test_config_endpoints_read_and_update_knobs() -> None:
    client = create_sandbox_app(SandboxConfig(seed=3)).test_client()
    assert client.get("/_sandbox/config").json["seed"] == 3

    answer = client.post("/_sandbox/config", json={"fail_rate": 1, "webhook_reorder": True})
    assert answer.status_code == 200
    assert answer.json["fail_rate"] == 1.0
    assert client.get("/_sandbox/config").json["webhook_reorder"] is True

    unknown = client.post("/_sandbox/config", json={"fail_rat": 1})
    assert unknown.status_code == 400
    assert "fail_rat" in unknown.json["error"]

    bad = client.post("/_sandbox/config", json={"pending_seconds": "never"})
    assert bad.status_code == 400
    assert "pending_seconds" in bad.json["error"]

    limits = {"lemondata_requests_per_minute": {"sandbox-key": 60}, "piclaza_max_concurrent": 2}
    answer = client.post("/_sandbox/config", json=limits)
    assert answer.json["lemondata_requests_per_minute"] == {"sandbox-key": 60}
    assert answer.json["piclaza_max_concurrent"] == {"*": 2}
    bad = client.post("/_sandbox/config", json={"piclaza_max_concurrent": {"k": 0}})
    assert bad.status_code == 400
    assert "piclaza_max_concurrent" in bad.json["error"]


def test_reset_forgets_tasks_and_restores_initial_knobs() -> None:
    app = create_sandbox_app(SandboxConfig(pending_seconds=5))
    state: SandboxState = app.extensions[EXTENSION_KEY]
    client = app.test_client()
    state.update_config(pending_seconds=9)
    created = client.post(
        "/piclaza/task/v1/image/vary",
        json={"image_url": "https://example.test/a.png", "title": "job-1"},
        headers={"X-API-Key": "sandbox-key"},
    )
    assert created.status_code == 200
    assert len(state.tasks()) == 1

    assert client.post("/_sandbox/reset").status_code == 200
    assert state.tasks() == []
    assert state.stats()["creates"]["piclaza"] == 0
    assert state.config.pending_seconds == 5

    state.update_config(pending_seconds=9)
    client.post("/_sandbox/reset", json={"keep_config": True})
    assert state.config.pending_seconds == 9
