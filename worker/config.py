"""Typed settings, read from ``VARIFLOW_*`` environment variables.

Settings are loaded by :func:`get_settings` the first time something asks for
them (process start), never at import time, so tests and the CLI can set the
environment first. A bad value stops start-up with :class:`ConfigError`, whose
message names the variable.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AnyHttpUrl,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from standardwebhooks.webhooks import Webhook

KNOWN_PROVIDERS = ("piapi", "piclaza", "lemondata")
ENV_PREFIX = "VARIFLOW_"


class ConfigError(RuntimeError):
    """A configuration value is missing or malformed; the message names the variable."""


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

    providers: Annotated[tuple[str, ...], NoDecode] = KNOWN_PROVIDERS

    piapi_api_key: SecretStr | None = None
    piapi_base_url: AnyHttpUrl = AnyHttpUrl("https://api.piapi.ai")
    piapi_webhook_secret: SecretStr | None = None
    piclaza_api_key: SecretStr | None = None
    piclaza_base_url: AnyHttpUrl = AnyHttpUrl("https://api.piclaza.com")
    lemondata_api_key: SecretStr | None = None
    lemondata_base_url: AnyHttpUrl = AnyHttpUrl("https://api.lemondata.cc")

    # HTTP to providers. LemonData may answer only when the images are done.
    http_connect_timeout: float = Field(default=5.0, gt=0)
    http_timeout: float = Field(default=30.0, gt=0)
    lemondata_create_timeout: float = Field(default=150.0, ge=120)

    # Submitting: a claim must outlive the longest create call, so that an
    # expired claim really means the worker is gone.
    submit_claim_ttl: float = Field(default=300.0, gt=0)
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
    piclaza_batch_size: int = Field(default=50, ge=1, le=100)
    piapi_webhook_grace: float = Field(default=120.0, ge=0)
    sweep_interval: float = Field(default=30.0, gt=0)
    lost_message_grace: float = Field(default=60.0, ge=0)

    # Results: provider URLs expire, so result images are archived here and
    # served by the web app under /results/ (inline base64 results always are).
    result_store: str = ""  # default: $VARIFLOW_HOME/results; "off" disables archiving

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
    metrics_dir: Path | None = None

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(p.strip().lower() for p in value.split(",") if p.strip())
        return value

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [p for p in value if p not in KNOWN_PROVIDERS]
        if unknown:
            raise ValueError(
                f"unknown provider {unknown[0]!r}; known: {', '.join(KNOWN_PROVIDERS)}"
            )
        if not value:
            raise ValueError("at least one provider must be enabled")
        return value

    @field_validator("database_url", "broker_url")
    @classmethod
    def _has_scheme(cls, value: str) -> str:
        if value and "://" not in value:
            # The value is not echoed: a mistyped URL may still carry a password.
            raise ValueError("not a URL (expected scheme://...)")
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
    def _claim_outlives_create(self) -> Settings:
        # A claim that expires while its create call still runs would let a
        # second worker create the task again.
        needed = max(self.lemondata_create_timeout, self.http_timeout) + 30
        if self.submit_claim_ttl < needed:
            raise ValueError(
                f"submit_claim_ttl: must be at least {needed:g}s (the longest create call + 30s)"
            )
        return self

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
    def results_folder(self) -> Path:
        if self.result_store and self.archive_results:
            return Path(self.result_store).resolve()
        return self.home.resolve() / "results"

    @property
    def public_base(self) -> str:
        return str(self.public_url).rstrip("/")

    def api_key(self, provider: str) -> str | None:
        secret: SecretStr | None = getattr(self, f"{provider}_api_key")
        return secret.get_secret_value() if secret else None

    def webhook_secret(self, provider: str) -> str | None:
        """The one global webhook secret of a provider, when configured."""
        secret: SecretStr | None = getattr(self, f"{provider}_webhook_secret", None)
        return secret.get_secret_value() if secret else None

    def webhook_grace(self, provider: str) -> float:
        """How long a webhook provider's job may go without a webhook before it is polled."""
        grace: float = getattr(self, f"{provider}_webhook_grace", self.poll_backoff_start)
        return grace

    def base_url(self, provider: str) -> str:
        return str(getattr(self, f"{provider}_base_url")).rstrip("/")


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, turning validation errors into ConfigError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = str(error["msg"]).removeprefix("Value error, ")
            if error["loc"]:
                field = str(error["loc"][0])
            else:  # a check across fields names its field first: "field: message"
                field, _, message = message.partition(": ")
            problems.append(f"{ENV_PREFIX}{field.upper()}: {message}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, loaded on first use."""
    return load_settings()


def reset_settings() -> None:
    """Forget the loaded settings (tests, and the CLI after changing the environment)."""
    get_settings.cache_clear()
