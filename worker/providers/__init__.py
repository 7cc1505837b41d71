"""The provider registry: adapters by name, built once per process from settings."""

from __future__ import annotations

import functools
import os

from worker.config import KNOWN_PROVIDERS, Settings, get_settings
from worker.providers.base import Provider
from worker.providers.http import get_client
from worker.providers.lemondata import LemonDataProvider
from worker.providers.piapi import PiAPIProvider
from worker.providers.piclaza import PiclazaProvider


def build_provider(name: str, settings: Settings) -> Provider:
    client, base, key = get_client(), settings.base_url(name), settings.api_key(name)
    if name == "piapi":
        return PiAPIProvider(client, base, key)
    if name == "piclaza":
        return PiclazaProvider(client, base, key, batch_poll_size=settings.piclaza_batch_size)
    if name == "lemondata":
        return LemonDataProvider(
            client,
            base,
            key,
            max_image_bytes=settings.max_image_bytes,
            create_timeout=settings.lemondata_create_timeout,
        )
    raise ValueError(f"provider: unknown provider {name!r}")


@functools.cache
def _provider_for(name: str, pid: int) -> Provider:
    return build_provider(name, get_settings())


def check_provider_name(name: object, *, for_new_job: bool = False) -> str:
    """A known provider's name; new jobs also need it enabled (VARIFLOW_PROVIDERS).

    Jobs already in flight keep their adapter when a provider is disabled, so
    they still finish (or fail) instead of being stranded.
    """
    enabled = get_settings().providers
    if not isinstance(name, str) or name not in KNOWN_PROVIDERS:
        raise ValueError(f"provider: unknown provider {name!r} (known: {', '.join(enabled)})")
    if for_new_job and name not in enabled:
        raise ValueError(f"provider: {name!r} is not enabled (VARIFLOW_PROVIDERS)")
    return name


def get_provider(name: str) -> Provider:
    return _provider_for(check_provider_name(name), os.getpid())


def reset_providers() -> None:
    _provider_for.cache_clear()
