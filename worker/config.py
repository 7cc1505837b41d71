"""Typed settings, read from ``VARIFLOW_*`` environment variables.

The core settings are declared here; each provider adapter declares its own
section (``VARIFLOW_<NAME>_*``, see worker/providers/base.py), and
:func:`load_settings` assembles both, so this module names no provider.

Entry points (the CLI, the Celery app, the WSGI app, the in-process API) call
:func:`get_settings` once, at a process's start, never at import time, and
pass the settings down. A bad value stops start-up with :class:`ConfigError`,
whose message names the variable.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AnyHttpUrl,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from standardwebhooks.webhooks import Webhook

from worker.accounts import DEFAULT_ACCOUNT, Account, Limits, limits_from, read_accounts_file
from worker.errors import ConfigError
from worker.providers import BUILTIN_PROVIDERS, registered
from worker.providers.base import ProviderSettings

__all__ = ["KNOWN_PROVIDERS", "ConfigError", "Settings", "get_settings", "load_settings"]

KNOWN_PROVIDERS = BUILTIN_PROVIDERS
ENV_PREFIX = "VARIFLOW_"


# S3 bucket names: 3-63 lower-case letters, digits, dots and hyphens, a letter or digit
# at each end (no credentials, ports or paths can hide in one).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class S3Location(NamedTuple):
    """``s3://bucket/prefix``: the bucket, and the prefix of every key (no slash at
    either end; may be empty)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        rest = url[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError("s3:// needs a bucket: s3://bucket or s3://bucket/prefix")
        if not _BUCKET.fullmatch(bucket):
            # The value is not echoed: a mistyped URL may carry a secret.
            raise ValueError(
                "not an S3 bucket name (3-63 lower-case letters, digits, '.' and '-'; "
                "credentials come from AWS_* variables, never the URL)"
            )
        if any(c in prefix for c in "?#\\") or ".." in prefix.split("/"):
            raise ValueError("the prefix after the bucket must be a plain path")
        return cls(bucket, prefix.strip("/"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Where state lives. Empty means the embedded default under `home`.
    home: Path = Path(".variflow")
    database_url: str = ""
    broker_url: str = ""
    queue: str = "variflow"

    # The webhook receiver: where it listens and how providers reach it.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    public_url: AnyHttpUrl | None = None
    # Threads per gunicorn worker of `variflow serve`. A `GET /v1/jobs/{id}?wait=`
    # holds one while it waits (never a database connection); at most all but
    # WEB_FREE_THREADS of them wait at once, so webhooks and creates always have threads.
    web_threads: int = Field(default=16, ge=1, le=512)

    # Providers new jobs may use (default: every registered one). Jobs already
    # in flight keep their adapter when a provider is disabled.
    providers: Annotated[tuple[str, ...], NoDecode] = Field(
        default_factory=lambda: tuple(registered())
    )

    # HTTP to providers (an adapter may declare a longer create call).
    http_connect_timeout: float = Field(default=5.0, gt=0)
    http_timeout: float = Field(default=30.0, gt=0)

    # Submitting: the worker holding a claim renews it every third of this
    # while it works, so an expired claim means the worker is gone; short, so
    # that a dead worker's job is picked up again soon.
    submit_claim_ttl: float = Field(default=30.0, ge=3)
    # How long a create's known answer is retried when it cannot be written
    # (the database restarting): in the worker, then in its retry message.
    submit_record_retry_for: float = Field(default=3600.0, gt=0)
    submit_max_retries: int = Field(default=8, ge=0)
    submit_retry_base: float = Field(default=2.0, gt=0)
    submit_retry_cap: float = Field(default=120.0, gt=0)
    default_deadline: float = Field(default=3600.0, gt=0)

    # Polling and the sweep (used by beat).
    poll_interval: float = Field(default=2.0, gt=0)
    poll_backoff_start: float = Field(default=2.0, gt=0)
    poll_backoff_factor: float = Field(default=1.5, ge=1)
    poll_backoff_cap: float = Field(default=60.0, gt=0)
    poll_batch_limit: int = Field(default=500, ge=1)
    # A leased job is polled again after this if its poll task is lost; the
    # task renews the lease while it works.
    poll_lease: float = Field(default=30.0, ge=3)
    sweep_interval: float = Field(default=30.0, gt=0)
    lost_message_grace: float = Field(default=60.0, ge=0)
    # Any number of beats may run; the one holding this lease (in the database) sends,
    # renewing it every third of this. A standby takes an expired lease at its next
    # check, so the leader's death stops scheduled sends for at most 4/3 of this.
    beat_lease_ttl: float = Field(default=30.0, ge=1, le=3600)

    # Results: provider URLs expire, so result images are archived here and
    # served by the web app under /results/ (inline base64 results always are).
    # A folder (default: $VARIFLOW_HOME/results), s3://bucket/prefix (endpoint, region and
    # credentials from the usual AWS_* variables), or "off" (no archiving).
    result_store: str = ""
    # How the web app serves results kept in S3: a redirect to a presigned URL valid this
    # long, or the bytes streamed through it (a bucket its clients cannot reach).
    result_serve: Literal["redirect", "stream"] = "redirect"
    result_url_ttl: int = Field(default=300, ge=1, le=7 * 24 * 3600)  # SigV4's maximum
    # Where clients reach the store, when not where variflow does (a compose network's
    # http://s3:9000 is not the browser's): presigned URLs are signed for this host.
    result_public_endpoint: AnyHttpUrl | None = None

    # Input images.
    max_image_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    allow_private_urls: bool = False

    # Telling the application: a Celery task sent with the job id, and/or a
    # signed POST (Standard Webhooks) to the job's notify_url.
    on_complete_task: str | None = None
    on_complete_queue: str = "celery"  # Celery's default queue: where an app's worker listens
    notify_secret: SecretStr | None = None
    notify_retry_for: float = Field(default=3600.0, gt=0)
    notify_timeout: float = Field(default=10.0, gt=0)
    archive_max_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    archive_timeout: float = Field(default=60.0, gt=0)

    # Operators: the dashboard and Flower are never open without credentials.
    dashboard_user: str | None = None
    dashboard_password: SecretStr | None = None
    flower_basic_auth: SecretStr | None = None
    # Prometheus samples, per host: a folder only this host's processes use (worker/metrics.py).
    metrics_dir: Path | None = None
    # A Celery worker's own /metrics, served by its main process (0: not served).
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    worker_metrics_host: str = "0.0.0.0"

    # Provider accounts and their capacity (worker/accounts.py, worker/capacity.py).
    accounts_file: Path | None = None
    # At a daily budget, new submissions wait for the next UTC day or fail at once.
    budget_policy: Literal["wait", "fail"] = "wait"
    # This many transient failures in a row open an account's breaker for the cool-down.
    breaker_threshold: int = Field(default=5, ge=1)
    breaker_cooldown: float = Field(default=60.0, gt=0)

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    # Each registered provider's own section, filled by load_settings().
    _sections: dict[str, ProviderSettings] = PrivateAttr(default_factory=dict)
    # Each provider's accounts, the first its default, filled by load_settings().
    _accounts: dict[str, tuple[Account, ...]] = PrivateAttr(default_factory=dict)

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(p.strip().lower() for p in value.split(",") if p.strip())
        return value

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = tuple(registered())
        if not value:
            raise ValueError("at least one provider must be enabled")
        unknown = [p for p in value if p not in known]
        if unknown:
            raise ValueError(f"unknown provider {unknown[0]!r}; known: {', '.join(known)}")
        return value

    @field_validator("database_url", "broker_url")
    @classmethod
    def _has_scheme(cls, value: str) -> str:
        if value and "://" not in value:
            # The value is not echoed: a mistyped URL may still carry a password.
            raise ValueError("not a URL (expected scheme://...)")
        return value

    @field_validator("result_store")
    @classmethod
    def _folder_s3_or_off(cls, value: str) -> str:
        if value.lower().startswith("s3://"):
            S3Location.parse(value)  # a ValueError says what is wrong
        elif "://" in value:
            raise ValueError("expected a folder, s3://bucket/prefix or off")
        return value

    @field_validator("notify_secret")
    @classmethod
    def _standard_webhooks_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                Webhook(value.get_secret_value())
            except Exception:
                raise ValueError("must be a Standard Webhooks secret: whsec_<base64>") from None
        return value

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        # Frozen model: defaults derived from other fields are set once, here.
        home = self.home.resolve()
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{home / 'variflow.db'}")
        if not self.broker_url:
            object.__setattr__(self, "broker_url", "filesystem://")
        if self.public_url is None:
            object.__setattr__(self, "public_url", AnyHttpUrl(f"http://127.0.0.1:{self.port}"))
        return self

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def broker_folder(self) -> Path:
        return self.home.resolve() / "broker"

    @property
    def archive_results(self) -> bool:
        return self.result_store.lower() != "off"

    @property
    def results_bucket(self) -> S3Location | None:
        """Where results go when the store is S3; None for a folder (or off)."""
        if self.result_store.lower().startswith("s3://"):
            return S3Location.parse(self.result_store)
        return None

    @property
    def results_folder(self) -> Path:
        """The folder results go to (unused when the store is S3)."""
        if self.result_store and self.archive_results and self.results_bucket is None:
            return Path(self.result_store).resolve()
        return self.home.resolve() / "results"

    @property
    def public_base(self) -> str:
        return str(self.public_url).rstrip("/")

    @property
    def metrics_folder(self) -> Path:
        return (self.metrics_dir or self.home / "metrics").resolve()

    @property
    def provider_names(self) -> tuple[str, ...]:
        """Every provider with a settings section (enabled for new jobs or not)."""
        return tuple(self._sections)

    def provider(self, name: str) -> ProviderSettings:
        """A provider's own settings section (VARIFLOW_<NAME>_*)."""
        return self._sections[name]

    def value_of(self, variable: str) -> Any:
        """The value of a VARIFLOW_* variable's setting (core or a provider's)."""
        model, field = variables()[variable]
        if model is Settings:
            return getattr(self, field)
        name = variable.removeprefix(ENV_PREFIX).removesuffix(f"_{field.upper()}").lower()
        return getattr(self.provider(name), field)

    @property
    def longest_call(self) -> float:
        """The longest a single provider call may take, across every provider."""
        return max(
            [self.http_timeout]
            + [self.provider(n).longest_call(self.http_timeout) for n in self.provider_names]
        )

    def accounts(self, provider: str) -> tuple[Account, ...]:
        """A provider's accounts (at least one: ``main``, of VARIFLOW_<P>_API_KEY)."""
        return self._accounts.get(provider) or (_main_account(provider, self.provider(provider)),)

    def api_key(self, provider: str) -> str | None:
        return self.provider(provider).key()

    def webhook_secret(self, provider: str) -> str | None:
        """The one global webhook secret of a provider, when its section declares one."""
        secret: SecretStr | None = getattr(self.provider(provider), "webhook_secret", None)
        return secret.get_secret_value() if secret else None

    def base_url(self, provider: str) -> str:
        return str(self.provider(provider).base_url).rstrip("/")


def variables() -> dict[str, tuple[type[BaseSettings], str]]:
    """Every VARIFLOW_* variable variflow reads: name -> (the settings model, its field).

    The core settings, then each registered provider's own section.
    """
    found: dict[str, tuple[type[BaseSettings], str]] = {
        f"{ENV_PREFIX}{field.upper()}": (Settings, field) for field in Settings.model_fields
    }
    for name, adapter in registered().items():
        for field in adapter.settings_model.model_fields:
            found[f"{ENV_PREFIX}{name.upper()}_{field.upper()}"] = (adapter.settings_model, field)
    return found


def default_of(variable: str) -> Any:
    """The default value of a VARIFLOW_* variable's setting."""
    model, field = variables()[variable]
    return model.model_fields[field].get_default(call_default_factory=True)


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, turning validation errors into ConfigError.

    ``overrides`` take field names: core ones (``port``) or a provider's,
    prefixed with its name (``piapi_base_url``).
    """
    adapters = registered()
    problems: list[str] = [
        f"{ENV_PREFIX}{field.upper()}: a setting of variflow itself, and also of provider "
        f"{name!r}: give the provider another name"
        for name in adapters
        for field in Settings.model_fields
        if field.startswith(f"{name}_")
    ]
    section_overrides: dict[str, dict[str, Any]] = {name: {} for name in adapters}
    core_overrides: dict[str, Any] = {}
    for key, value in overrides.items():
        name = next((n for n in adapters if key.startswith(f"{n}_")), None)
        if name is None or key in Settings.model_fields:
            core_overrides[key] = value
        else:
            section_overrides[name][key.removeprefix(f"{name}_")] = value

    sections: dict[str, ProviderSettings] = {}
    for name, adapter in adapters.items():
        prefix = f"{ENV_PREFIX}{name.upper()}_"
        try:
            sections[name] = adapter.settings_model(
                _env_prefix=prefix,
                **section_overrides[name],
            )
        except ValidationError as exc:
            problems += _named(exc, prefix)
    try:
        settings = Settings(**core_overrides)
    except ValidationError as exc:
        problems = _named(exc, ENV_PREFIX) + problems
    if not problems:
        settings._sections = sections
        try:
            settings._accounts = _accounts_of(settings)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
    return settings


def _main_account(provider: str, section: ProviderSettings) -> Account:
    values = {name: getattr(section, name) for name in Limits.names()}
    return Account(provider, DEFAULT_ACCOUNT, section.key(), limits_from(values, provider))


def _accounts_of(settings: Settings) -> dict[str, tuple[Account, ...]]:
    accounts: dict[str, tuple[Account, ...]] = {
        name: (_main_account(name, settings.provider(name)),) for name in settings.provider_names
    }
    if settings.accounts_file is not None:
        accounts.update(
            read_accounts_file(settings.accounts_file, os.environ, settings.provider_names)
        )
    adapters = registered()
    for provider, declared in accounts.items():
        for account in declared:
            if account.limits.max_staged and not adapters[provider].queues_over_capacity:
                raise ConfigError(
                    f"{account.label}: max_staged is for providers that queue tasks beyond "
                    f"their slots; {provider} refuses them"
                )
    return accounts


def _named(exc: ValidationError, prefix: str) -> list[str]:
    problems = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["loc"]:
            field = str(error["loc"][0])
        else:  # a check across fields names its field first: "field: message"
            field, _, message = message.partition(": ")
        problems.append(f"{prefix}{field.upper()}: {message}")
    return problems


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, loaded on first use (by an entry point)."""
    return load_settings()


def reset_settings() -> None:
    """Forget the loaded settings (tests, and the CLI after changing the environment)."""
    get_settings.cache_clear()
