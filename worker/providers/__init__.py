"""The provider registry: adapters by name, built once per process from settings."""

from __future__ import annotations

import functools
import os

from worker.config import KNOWN_PROVIDERS, Settings, get_settings
from worker.providers.base import Provider
from worker.providers.http import get_client
from worker.providers.piapi import PiAPIProvider

_ADAPTERS: dict[str, type] = {"piapi": PiAPIProvider}


def build_provider(name: str, settings: Settings) -> Provider:
    adapter = _ADAPTERS[name]
    provider: Provider = adapter(get_client(), settings.base_url(name), settings.api_key(name))
    return provider


@functools.cache
def _provider_for(name: str, pid: int) -> Provider:
    return build_provider(name, get_settings())


def check_provider_name(name: object) -> str:
    enabled = get_settings().providers
    if not isinstance(name, str) or name not in KNOWN_PROVIDERS or name not in _ADAPTERS:
        raise ValueError(f"provider: unknown provider {name!r} (known: {', '.join(enabled)})")
    if name not in enabled:
        raise ValueError(f"provider: {name!r} is not enabled (VARIFLOW_PROVIDERS)")
    return name


def get_provider(name: str) -> Provider:
    return _provider_for(check_provider_name(name), os.getpid())


def reset_providers() -> None:
    _provider_for.cache_clear()
