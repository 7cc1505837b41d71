"""A process's runtime: everything built from the settings, once, at an entry point.

An entry point (the CLI, the Celery worker, the WSGI app, the in-process API)
reads the settings once and builds a :class:`Runtime` — the database, the HTTP
client and one adapter per provider — and the flows take it (or parts of it)
as a parameter. Nothing below the entry points reads the environment.

Each process has at most one *current* runtime (:func:`install` /
:func:`current`), which entry points such as Celery tasks look up; a forked
child (Celery prefork) gets its own engine and client, built again from the
same settings, since sockets must not cross a fork.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
from pydantic import SecretStr
from sqlalchemy.orm import Session

from worker import metrics
from worker.accounts import DEFAULT_ACCOUNT, Account
from worker.config import Settings
from worker.db import Database
from worker.errors import InvalidInput
from worker.hooks import AfterTheEnd, Consumer
from worker.providers import adapter_class
from worker.providers.base import AdapterContext, Provider
from worker.providers.http import make_client
from worker.result_store import FolderStore, S3Store, open_store


class Providers:
    """The adapters of one process, by name: every provider with settings, enabled or not
    (jobs already in flight keep their adapter when a provider is disabled), and one
    adapter per account of each provider (worker/accounts.py), the first the default."""

    def __init__(
        self,
        adapters: Mapping[str, Provider],
        enabled: Sequence[str],
        accounts: Mapping[str, Sequence[tuple[Account, Provider]]] | None = None,
    ) -> None:
        self._adapters = dict(adapters)
        self.enabled = tuple(enabled)
        self._accounts = {name: tuple(pairs) for name, pairs in (accounts or {}).items()}

    @classmethod
    def build(cls, settings: Settings, client: httpx.Client) -> Providers:
        context = AdapterContext(client=client, max_image_bytes=settings.max_image_bytes)
        accounts: dict[str, list[tuple[Account, Provider]]] = {}
        for name in settings.provider_names:
            section = settings.provider(name)
            for account in settings.accounts(name):
                # The account's key in its own copy of the section: the adapter is the same.
                key = SecretStr(account.api_key) if account.api_key else None
                own = section.model_copy(update={"api_key": key})
                adapter = adapter_class(name).from_settings(own, context)
                accounts.setdefault(name, []).append((account, adapter))
        adapters = {name: pairs[0][1] for name, pairs in accounts.items()}
        return cls(adapters, settings.providers, accounts)

    def accounts(self, name: str) -> tuple[Account, ...]:
        """The provider's accounts (the first is the default)."""
        found = self._accounts.get(name)
        if not found:
            return (Account(name, DEFAULT_ACCOUNT),)
        return tuple(account for account, _ in found)

    def for_account(self, name: str, account: str | None) -> Provider:
        """The adapter holding ``account``'s key; the provider's default for a job bound
        to no account (or to one no longer configured)."""
        for known, adapter in self._accounts.get(name, ()):
            if known.name == account:
                return adapter
        return self.get(name)

    def get(self, name: object) -> Provider:
        """A known provider's adapter, or InvalidInput naming the field."""
        if not isinstance(name, str) or name not in self._adapters:
            raise InvalidInput(
                "provider", f"unknown provider {name!r} (known: {', '.join(self.enabled)})"
            )
        return self._adapters[name]

    def for_new_job(self, name: object) -> Provider:
        """The adapter of a provider new jobs may use (VARIFLOW_PROVIDERS)."""
        adapter = self.get(name)
        if name not in self.enabled:
            raise InvalidInput("provider", f"{name!r} is not enabled (VARIFLOW_PROVIDERS)")
        return adapter

    def __iter__(self) -> Iterator[Provider]:
        return iter(self._adapters.values())

    def names(self) -> tuple[str, ...]:
        return tuple(self._adapters)


@dataclass
class Runtime:
    settings: Settings
    db: Database
    http: httpx.Client
    providers: Providers
    # Where result images are kept; an S3 store's client is built once, on first use.
    results: FolderStore | S3Store
    consumers: tuple[Consumer, ...] = ()
    pid: int = field(default_factory=os.getpid)

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        consumers: Sequence[Consumer] = (),
        http: httpx.Client | None = None,
    ) -> Runtime:
        """Build everything from ``settings``; ``consumers`` learn of every job that ended."""
        client = http or make_client(settings.http_timeout, settings.http_connect_timeout)
        return cls(
            settings=settings,
            db=Database(
                settings.database_url,
                consumers,
                AfterTheEnd(settings.archive_results, bool(settings.on_complete_task)),
                # A connection kept for each web thread (a Celery process uses one at a
                # time and opens no more: connections are opened on demand).
                pool_size=max(5, settings.web_threads),
            ),
            http=client,
            providers=Providers.build(settings, client),
            results=open_store(settings),
            consumers=tuple(consumers),
        )

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.db.session() as session:
            yield session

    @contextmanager
    def autocommit(self) -> Iterator[Session]:
        with self.db.autocommit() as session:
            yield session

    def close(self) -> None:
        self.db.dispose()
        self.http.close()
        self.results.close()


_lock = threading.Lock()
_current: Runtime | None = None


def install(runtime: Runtime) -> Runtime:
    """Make ``runtime`` this process's current one (closing the one it replaces).

    The process's metrics go to the folder of its settings from now on.
    """
    global _current
    with _lock:
        previous, _current = _current, runtime
        metrics.configure(runtime.settings.metrics_folder, runtime.settings.provider_names)
    if previous is not None and previous is not runtime and previous.pid == os.getpid():
        previous.close()
    return runtime


def ensure(build: Callable[[], Runtime]) -> Runtime:
    """This process's runtime, installing ``build()`` if there is none yet.

    Safe to call from many threads at once: one runtime is built, and none
    that another thread holds is closed.
    """
    global _current
    with _lock:
        if _current is None:
            _current = build()
            metrics.configure(_current.settings.metrics_folder, _current.settings.provider_names)
    return current()


def uninstall() -> None:
    """Close and forget this process's runtime (tests, the end of a script)."""
    global _current
    with _lock:
        previous, _current = _current, None
    if previous is not None and previous.pid == os.getpid():
        previous.close()


def current() -> Runtime:
    """This process's runtime; a forked child builds its own from the same settings."""
    global _current
    runtime = _current
    if runtime is None:
        raise RuntimeError("no runtime installed: an entry point must call worker.runtime.install")
    if runtime.pid != os.getpid():
        with _lock:
            if _current is runtime:
                _current = Runtime.build(runtime.settings, consumers=runtime.consumers)
            runtime = _current
    assert runtime is not None
    return runtime


def installed() -> Runtime | None:
    return _current


@contextmanager
def session_scope() -> Iterator[Session]:
    """A transaction on the current runtime's database (scripts, tests, the CLI)."""
    with current().session() as session:
        yield session
