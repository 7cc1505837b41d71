"""Bearer tokens of the HTTP API: issued once, stored as a hash, revoked by name.

A token's secret is 256 random bits (``vf_`` + URL-safe base64), shown once
when it is issued; the database keeps its SHA-256, so a leaked table grants
nothing. Looking a secret up is a lookup of its hash (a unique index): no
comparison of secrets happens in Python, so none can leak timing. Every
function works inside the caller's transaction and never commits.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from worker.errors import InvalidInput, VariflowError
from worker.models import ApiToken, utcnow

PREFIX = "vf_"
# Names and tenants appear in URLs, logs and the dashboard: keep them plain.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class TokenNotFound(VariflowError, LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no token named {name!r}")


@dataclass(frozen=True)
class TokenInfo:
    """What the API learns from a valid token (never its secret)."""

    name: str
    tenant: str
    admin: bool
    created_at: datetime
    revoked_at: datetime | None = None

    @classmethod
    def of(cls, token: ApiToken) -> TokenInfo:
        return cls(token.name, token.tenant, token.admin, token.created_at, token.revoked_at)


def check_name(field: str, value: object) -> None:
    """A token's name or a tenant: plain enough for URLs, logs and the dashboard."""
    if not isinstance(value, str) or not NAME.match(value):
        raise InvalidInput(field, "1 to 64 letters, digits, '.', '_' or '-', not first")


def secret_hash(secret: str) -> str:
    # 256 random bits: a plain SHA-256 is enough (there is nothing to guess slowly).
    return hashlib.sha256(secret.encode()).hexdigest()


def issue(
    session: Session, name: str, tenant: str | None = None, *, admin: bool = False
) -> tuple[TokenInfo, str]:
    """A new token named ``name`` for ``tenant`` (default: its name) and its secret,
    which is not stored and cannot be shown again."""
    tenant = name if tenant is None else tenant
    check_name("name", name)
    check_name("tenant", tenant)
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise InvalidInput("name", f"a token named {name!r} exists (names are never reused)")
    secret = PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        name=name, tenant=tenant, secret_hash=secret_hash(secret), admin=admin, created_at=utcnow()
    )
    session.add(token)
    session.flush()
    return TokenInfo.of(token), secret


def authenticate(session: Session, secret: str | None) -> TokenInfo | None:
    """The live token whose secret this is, or None (unknown, malformed or revoked)."""
    if not secret or not secret.startswith(PREFIX) or len(secret) > 128:
        return None
    # Columns, not an ORM object: this runs before every API call.
    found = session.execute(_BY_HASH, {"secret_hash": secret_hash(secret)}).one_or_none()
    if found is None or found.revoked_at is not None:
        return None
    return TokenInfo(found.name, found.tenant, found.admin, found.created_at, None)


_BY_HASH = select(
    ApiToken.name, ApiToken.tenant, ApiToken.admin, ApiToken.created_at, ApiToken.revoked_at
).where(ApiToken.secret_hash == bindparam("secret_hash"))


def listed(session: Session) -> list[TokenInfo]:
    """Every token, revoked ones too, oldest first."""
    return [
        TokenInfo.of(t) for t in session.scalars(select(ApiToken).order_by(ApiToken.created_at))
    ]


def revoke(session: Session, name: str) -> TokenInfo:
    """Revoke the token ``name`` at once (revoking it again changes nothing)."""
    token = session.scalar(select(ApiToken).where(ApiToken.name == name).with_for_update())
    if token is None:
        raise TokenNotFound(name)
    if token.revoked_at is None:
        token.revoked_at = utcnow()
    return TokenInfo.of(token)
