"""Provider accounts: an API key and what it may do (slots, rates, daily budgets).

Paid providers sell capacity per account, not per call: a Midjourney plan runs
3 or 12 jobs at once, PiAPI allows 30 or 60 "incorrect" tasks a day, LemonData
1,000 requests a minute. An :class:`Account` is one API key with those
:class:`Limits`; a provider has one or more. They come from the environment:

- one account per provider, ``main``: ``VARIFLOW_<P>_API_KEY`` with the limits
  ``VARIFLOW_<P>_MAX_IN_FLIGHT``, ``_MAX_STAGED``, ``_CREATES_PER_MINUTE``,
  ``_REQUESTS_PER_MINUTE``, ``_DAILY_JOBS``, ``_DAILY_FAILED``, ``_PRICE_PER_JOB``,
  ``_PRICE_PER_IMAGE``, ``_DAILY_SPEND_CAP`` (unset: no limit);
- or several, in the TOML file named by ``VARIFLOW_ACCOUNTS_FILE``: a table per
  account, ``[piapi.main]``, with ``api_key_env`` (the *name* of the variable
  holding its key: keys never sit in files) and the same limits. A provider
  named in the file has exactly the accounts the file gives it.

Accounts are named, and shown with a fingerprint of the key (never the key).
This module is plain data and parsing: no I/O beyond reading the file.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from worker.errors import ConfigError

DEFAULT_ACCOUNT = "main"
# The limits that can make a job wait (prices only say what a job costs).
ADMISSION_LIMITS = (
    "max_in_flight",
    "creates_per_minute",
    "requests_per_minute",
    "daily_jobs",
    "daily_failed",
    "daily_spend_cap",
)
ACCOUNT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class Limits:
    """What one account may do; None is no limit."""

    max_in_flight: int | None = None  # jobs submitted and not yet terminal
    # Beyond max_in_flight, jobs the provider holds in its own queue and starts as its
    # slots free (PiAPI's "staged"): a slot's next job is already upstream when it
    # frees, with no round trip through variflow. Only for providers that queue.
    max_staged: int | None = None
    creates_per_minute: int | None = None
    requests_per_minute: int | None = None  # every call: create, poll, cancel
    daily_jobs: int | None = None  # creates per UTC day
    daily_failed: int | None = None  # upstream failures per UTC day (PiAPI's allowance)
    price_per_job: float | None = None  # for providers that do not report a cost
    price_per_image: float | None = None
    daily_spend_cap: float | None = None

    @property
    def unlimited(self) -> bool:
        """No limit at all (prices alone limit nothing): admission has nothing to do."""
        return all(getattr(self, name) is None for name in ADMISSION_LIMITS)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class Account:
    provider: str
    name: str
    api_key: str | None = field(default=None, repr=False)  # the clear key: adapters only
    limits: Limits = Limits()

    @property
    def label(self) -> str:
        return f"{self.provider}/{self.name}"

    @property
    def fingerprint(self) -> str:
        """Who the key is, for people: 8 hex digits of its SHA-256 ("-" without a key)."""
        if not self.api_key:
            return "-"
        return hashlib.sha256(self.api_key.encode()).hexdigest()[:8]


def limits_from(values: Mapping[str, Any], where: str) -> Limits:
    """Limits from a mapping of the names of :class:`Limits`; ConfigError names ``where``."""
    kwargs: dict[str, Any] = {}
    for name in Limits.names():
        value = values.get(name)
        if value is None:
            continue
        money = name.startswith(("price", "daily_spend"))
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}.{name}: a number, got {value!r}")
        if not money and not isinstance(value, int):
            raise ConfigError(f"{where}.{name}: a whole number, got {value!r}")
        if value < (0 if money or name in ("daily_failed", "max_staged") else 1):
            raise ConfigError(f"{where}.{name}: must be positive, got {value!r}")
        kwargs[name] = value
    if kwargs.get("max_staged") and "max_in_flight" not in kwargs:
        raise ConfigError(f"{where}.max_staged: needs max_in_flight (staged beyond the slots)")
    return Limits(**kwargs)


def read_accounts_file(
    path: Path, environ: Mapping[str, str], providers: tuple[str, ...]
) -> dict[str, tuple[Account, ...]]:
    """The accounts a TOML file declares, by provider (keys read from ``environ``)."""
    where = "VARIFLOW_ACCOUNTS_FILE"
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path} ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: {path} is not valid TOML ({exc})") from None
    found: dict[str, tuple[Account, ...]] = {}
    for provider, tables in document.items():
        if provider not in providers:
            raise ConfigError(f"{where}: [{provider}] is not a provider ({', '.join(providers)})")
        if not isinstance(tables, dict) or not tables:
            raise ConfigError(f"{where}: [{provider}.<account>] tables are expected")
        accounts = []
        for name, table in tables.items():
            at = f"{where}: [{provider}.{name}]"
            if not ACCOUNT_NAME.match(name):
                raise ConfigError(f"{at}: an account name is 1-32 of a-z 0-9 _ -")
            if not isinstance(table, dict):
                raise ConfigError(f"{at}: a table of settings is expected")
            unknown = set(table) - {"api_key_env", *Limits.names()}
            if unknown:
                raise ConfigError(f"{at}: unknown setting {sorted(unknown)[0]!r}")
            if "api_key" in table:
                raise ConfigError(f"{at}: keys stay in the environment: use api_key_env")
            variable = table.get("api_key_env")
            key = None
            if variable is not None:
                if not isinstance(variable, str) or variable not in environ:
                    raise ConfigError(f"{at}: api_key_env names {variable!r}, which is not set")
                key = environ[variable]
            accounts.append(Account(provider, name, key, limits_from(table, at)))
        found[provider] = tuple(accounts)
    return found
