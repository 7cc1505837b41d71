"""Every knob of the sandbox, with its default, and how knobs are read and changed.

Knobs come from three places that must agree on types: the constructor (Python
tests), ``VARIFLOW_SANDBOX_<FIELD>`` environment variables (strings) and
``POST /_sandbox/config`` (JSON values). Each field therefore carries one
converter that accepts a native value or its text form, so all three paths
validate the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

ENV_PREFIX = "VARIFLOW_SANDBOX_"
LEMONDATA_MODES = ("sync", "async", "mixed")
# In a per-key limit table, the limit of every key not named in it.
WILDCARD_KEY = "*"

Converter = Callable[[object], Any]


def _to_float(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, int | float | str):
        number = float(value.strip() if isinstance(value, str) else value)
        if math.isfinite(number):
            return number
    raise ValueError(f"expected a finite number, got {value!r}")


def _to_int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return int(value.strip())
    raise ValueError(f"expected an integer, got {value!r}")


def _to_optional_int(value: object) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return _to_int(value)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _to_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(f"expected a boolean, got {value!r}")


def _as_list(value: object) -> list[object]:
    """Accept a list, a JSON list in text, or comma-separated text."""
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            parsed = json.loads(text)
            if not isinstance(parsed, list):
                raise ValueError(f"expected a list, got {value!r}")
            return cast(list[object], parsed)
        return [part.strip() for part in text.split(",") if part.strip()]
    raise ValueError(f"expected a list, got {value!r}")


def _to_str_list(value: object) -> list[str]:
    items = _as_list(value)
    if not all(isinstance(item, str) and item for item in items):
        raise ValueError(f"expected a list of non-empty strings, got {value!r}")
    return [str(item) for item in items]


def _to_int_list(value: object) -> list[int]:
    return [_to_int(item) for item in _as_list(value)]


def _key_limits(minimum: int) -> Converter:
    """A per-key limit table: ``{key: n}``, with ``"*"`` for every other key.

    Given as a mapping or JSON object, as ``key=n,key2=m`` text, or as one
    number meaning ``{"*": n}``. An empty value (the default) means no limit.
    """

    def convert(value: object) -> dict[str, int]:
        if value is None:
            return {}
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return {}
            if text.startswith("{"):
                value = json.loads(text)
            elif "=" in text:
                pairs = [part.rpartition("=") for part in text.split(",") if part.strip()]
                value = {key.strip(): number for key, _, number in pairs}
        if not isinstance(value, dict):
            return convert({WILDCARD_KEY: value})
        table: dict[str, int] = {}
        for key, number in cast(dict[object, object], value).items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"expected non-empty API keys, got {key!r}")
            table[key] = _to_int(number)
            if table[key] < minimum:
                raise ValueError(f"the limit of {key!r} must be at least {minimum}")
        return table

    return convert


def _to_mode(value: object) -> str:
    if isinstance(value, str) and value.strip() in LEMONDATA_MODES:
        return value.strip()
    raise ValueError(f"expected one of {', '.join(LEMONDATA_MODES)}, got {value!r}")


# One converter per knob; ``__post_init__`` runs them so every path validates alike.
_CONVERTERS: dict[str, Converter] = {
    "api_keys": _to_str_list,
    "seed": _to_optional_int,
    "pending_seconds": _to_float,
    "processing_seconds": _to_float,
    "fail_rate": _to_float,
    "images_per_task": _to_int,
    "image_size": _to_int,
    "transient_error_rate": _to_float,
    "transient_error_codes": _to_int_list,
    "retry_after_seconds": _to_int,
    "rate_limit_all": _to_bool,
    "slow_rate": _to_float,
    "slow_seconds": _to_float,
    "malformed_json_rate": _to_float,
    "webhook_retry_attempts": _to_int,
    "webhook_retry_base_seconds": _to_float,
    "webhook_timeout_seconds": _to_float,
    "webhook_drop_rate": _to_float,
    "webhook_duplicate_rate": _to_float,
    "webhook_reorder": _to_bool,
    "lemondata_mode": _to_mode,
    "lemondata_max_image_bytes": _to_int,
    "piapi_max_concurrent": _key_limits(1),
    "piapi_daily_failed_allowance": _key_limits(0),
    "piclaza_max_concurrent": _key_limits(1),
    "lemondata_requests_per_minute": _key_limits(1),
}


@dataclass
class SandboxConfig:
    """All sandbox knobs. Invalid values raise ``ValueError`` naming the knob."""

    # Keys accepted by all three providers.
    api_keys: list[str] = field(default_factory=lambda: ["sandbox-key"])
    # Seed of the RNG behind every random decision; None = unpredictable.
    seed: int | None = None
    pending_seconds: float = 0.3
    processing_seconds: float = 0.6
    # Share of tasks decided at creation to end failed.
    fail_rate: float = 0.0
    # Result images of one PiAPI or Piclaza task, and their side in pixels.
    images_per_task: int = 4
    image_size: int = 256
    # Share of provider calls answered with a status from transient_error_codes.
    transient_error_rate: float = 0.0
    transient_error_codes: list[int] = field(default_factory=lambda: [429, 500, 502, 503])
    retry_after_seconds: int = 1
    rate_limit_all: bool = False
    # Share of provider calls answered ``slow_seconds`` late (after doing the work).
    slow_rate: float = 0.0
    slow_seconds: float = 5.0
    # Share of provider calls answered 200 with a truncated JSON body.
    malformed_json_rate: float = 0.0
    webhook_retry_attempts: int = 5
    webhook_retry_base_seconds: float = 0.2
    webhook_timeout_seconds: float = 5.0
    webhook_drop_rate: float = 0.0
    webhook_duplicate_rate: float = 0.0
    webhook_reorder: bool = False
    lemondata_mode: str = "sync"
    lemondata_max_image_bytes: int = 4 * 1024 * 1024
    # Capacity per API key (sandbox/capacity.py); empty = unlimited, "*" = every other key.
    # PiAPI: tasks beyond max_concurrent wait as "staged"; creates are refused once the
    # key's failed tasks of the UTC day reach the allowance.
    piapi_max_concurrent: dict[str, int] = field(default_factory=dict)
    piapi_daily_failed_allowance: dict[str, int] = field(default_factory=dict)
    # Piclaza refuses creates beyond max_concurrent; LemonData counts every request.
    piclaza_max_concurrent: dict[str, int] = field(default_factory=dict)
    lemondata_requests_per_minute: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            convert = _CONVERTERS[f.name]
            try:
                setattr(self, f.name, convert(getattr(self, f.name)))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{f.name}: {exc}") from exc
        self._check_ranges()

    def _check_ranges(self) -> None:
        for name in (
            "fail_rate",
            "transient_error_rate",
            "slow_rate",
            "malformed_json_rate",
            "webhook_drop_rate",
            "webhook_duplicate_rate",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be between 0 and 1")
        for name in (
            "pending_seconds",
            "processing_seconds",
            "slow_seconds",
            "webhook_retry_base_seconds",
            "retry_after_seconds",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must not be negative")
        if self.webhook_timeout_seconds <= 0:
            raise ValueError("webhook_timeout_seconds: must be positive")
        if self.webhook_retry_attempts < 1:
            raise ValueError("webhook_retry_attempts: must be at least 1")
        if not self.api_keys:
            raise ValueError("api_keys: at least one key is required")
        if not self.transient_error_codes:
            raise ValueError("transient_error_codes: at least one status is required")
        if any(not 400 <= code <= 599 for code in self.transient_error_codes):
            raise ValueError("transient_error_codes: statuses must be 4xx or 5xx")
        if not 1 <= self.images_per_task <= 16:
            raise ValueError("images_per_task: must be between 1 and 16")
        if not 16 <= self.image_size <= 2048:
            raise ValueError("image_size: must be between 16 and 2048")
        if self.lemondata_max_image_bytes < 1:
            raise ValueError("lemondata_max_image_bytes: must be positive")

    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SandboxConfig:
        """Read ``VARIFLOW_SANDBOX_<FIELD>`` variables; unset ones keep their default."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            variable = ENV_PREFIX + f.name.upper()
            if variable not in env:
                continue
            try:
                values[f.name] = _CONVERTERS[f.name](env[variable])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{variable}: {exc}") from exc
        try:
            return cls(**values)
        except ValueError as exc:
            # Range errors name the field; name the variable the user must fix instead.
            name, _, reason = str(exc).partition(": ")
            raise ValueError(f"{ENV_PREFIX}{name.upper()}: {reason}") from exc

    def updated(self, changes: Mapping[str, object]) -> SandboxConfig:
        """A copy with ``changes`` applied; unknown knobs raise ``KeyError`` naming them."""
        unknown = sorted(set(changes) - set(self.knob_names()))
        if unknown:
            raise KeyError(", ".join(unknown))
        return dataclasses.replace(self, **cast(dict[str, Any], dict(changes)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
