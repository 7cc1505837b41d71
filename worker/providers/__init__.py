"""The provider registry: which adapters variflow knows, by name.

Adding a provider is one line here (plus its adapter module and its sandbox
module): everything else — settings, capabilities, limits — the adapter
declares itself. :func:`register` also takes adapters defined elsewhere
(tests, a deployment's own provider).
"""

from __future__ import annotations

from worker.errors import InvalidInput
from worker.providers.base import Provider
from worker.providers.lemondata import LemonDataProvider
from worker.providers.piapi import PiAPIProvider
from worker.providers.piclaza import PiclazaProvider

_registry: dict[str, type[Provider]] = {}


def register(adapter: type[Provider]) -> type[Provider]:
    """Make an adapter class known under its ``name`` (usable as a decorator)."""
    _registry[adapter.name] = adapter
    return adapter


def unregister(name: str) -> None:
    _registry.pop(name, None)


def registered() -> dict[str, type[Provider]]:
    """Known adapter classes by name, in registration order."""
    return dict(_registry)


def adapter_class(name: object) -> type[Provider]:
    """The adapter class of a provider name, or InvalidInput naming the field."""
    if not isinstance(name, str) or name not in _registry:
        raise InvalidInput("provider", f"unknown provider {name!r} (known: {', '.join(_registry)})")
    return _registry[name]


for _adapter in (PiAPIProvider, PiclazaProvider, LemonDataProvider):  # the registration line
    register(_adapter)

BUILTIN_PROVIDERS = tuple(_registry)
