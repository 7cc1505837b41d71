"""Who may use the dashboard, and which of its POSTs are the operator's own.

Basic auth: credentials come from VARIFLOW_DASHBOARD_USER and
VARIFLOW_DASHBOARD_PASSWORD; unless both are set there is no dashboard (404).

CSRF. A browser that has the dashboard's basic credentials cached sends them
with *any* request to the dashboard's origin, including a form another site
posts there, so every POST must prove it came from a page the dashboard
rendered. The protection chosen is a stateless HMAC token plus a same-origin
check, rather than flask-wtf's session-bound token, because:

- the dashboard has no session and needs none: basic auth identifies the
  operator on every request. flask-wtf would add a session cookie, an
  app-wide SECRET_KEY (webhooks/__init__.py, shared with every blueprint),
  and its CSRFProtect would guard every POST of the app, webhooks from
  providers included (or need exemptions for each);
- the token can be bound to what matters here: the basic-auth user, a time
  window, and a key derived from the dashboard password (HMAC), so changing
  the password voids every token issued before, with no new setting;
- it is a dozen lines of standard-library HMAC, with a constant-time compare.

A token is ``<issued unix time>.<hex HMAC-SHA256(key, user, issued time)>``,
valid for :data:`TOKEN_LIFETIME`. An attacker's page cannot read it (the
same-origin policy, and ``frame-ancestors 'none'``), so cannot forge a POST.
The origin check is defence in depth: a browser's POST says where it comes
from (Sec-Fetch-Site; Origin, which is why the pages' referrer policy is
``same-origin``: under ``no-referrer`` a browser sends ``Origin: null`` even to
the page's own origin), and anything not same-origin is refused before the
token is looked at. Clients that send neither header (curl, scripts) still
need the token.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection
from urllib.parse import urlsplit

from worker.config import Settings

REALM = "variflow dashboard"
# Long enough for a page left open through a shift, short enough that a token
# copied out of a page (a screenshot, a saved page) soon stops working.
TOKEN_LIFETIME = 8 * 3600
# Tokens from a server whose clock is a little ahead (several web processes).
CLOCK_SKEW = 300
_KEY_LABEL = b"variflow dashboard csrf v1"


def _digest(value: str) -> bytes:
    # Hashing first makes the comparison independent of the lengths, too.
    return hashlib.sha256(value.encode("utf-8")).digest()


def credentials_match(user: str, password: str, settings: Settings) -> bool:
    assert settings.dashboard_user is not None and settings.dashboard_password is not None
    user_ok = hmac.compare_digest(_digest(user), _digest(settings.dashboard_user))
    password_ok = hmac.compare_digest(
        _digest(password), _digest(settings.dashboard_password.get_secret_value())
    )
    return user_ok and password_ok  # both compared, whatever the first answered


def dashboard_enabled(settings: Settings) -> bool:
    return bool(
        settings.dashboard_user
        and settings.dashboard_password
        and settings.dashboard_password.get_secret_value()
    )


# --- CSRF tokens ---------------------------------------------------------------


def _token_mac(settings: Settings, user: str, issued: int) -> bytes:
    assert settings.dashboard_password is not None
    # The key is derived, never the password itself: a MAC reveals nothing of it,
    # and no other use of the password can produce a valid token.
    key = hmac.new(
        settings.dashboard_password.get_secret_value().encode("utf-8"), _KEY_LABEL, hashlib.sha256
    ).digest()
    message = f"{user}\n{issued}".encode()
    return hmac.new(key, message, hashlib.sha256).digest()


def issue_token(settings: Settings, user: str, now: float) -> str:
    issued = int(now)
    return f"{issued}.{_token_mac(settings, user, issued).hex()}"


def token_valid(settings: Settings, user: str, token: str, now: float) -> bool:
    """Whether ``token`` was issued to ``user`` under the current password, recently."""
    issued_text, dot, mac_hex = token.partition(".")
    # isascii first: str.isdigit() is also true of digits int() does not take ("²").
    if not dot or not issued_text.isascii() or not issued_text.isdigit() or len(issued_text) > 12:
        return False
    issued = int(issued_text)
    if not -CLOCK_SKEW <= now - issued <= TOKEN_LIFETIME:
        return False
    try:
        mac = bytes.fromhex(mac_hex)
    except ValueError:
        return False
    return hmac.compare_digest(mac, _token_mac(settings, user, issued))


# --- same origin -----------------------------------------------------------------


def cross_origin(site: str | None, origin: str | None, own_hosts: Collection[str]) -> str | None:
    """Why a POST is not from one of the dashboard's own pages, or None.

    ``site`` and ``origin`` are the request's Sec-Fetch-Site and Origin headers;
    ``own_hosts`` the host[:port] the dashboard is reached at (the request's
    Host, and VARIFLOW_PUBLIC_URL's behind a proxy that rewrites Host). Schemes
    are not compared: a proxy ending TLS makes the app see http for an https page.
    """
    if site is not None and site != "same-origin":
        return f"Sec-Fetch-Site is {site!r}"
    if origin is not None:
        try:
            host = urlsplit(origin).netloc.lower() if origin != "null" else ""
        except ValueError:  # "http://[::1" and the like
            host = ""
        if not host or host not in {h.lower() for h in own_hosts}:
            return f"Origin {origin!r} is not this dashboard's"
    return None


def own_hosts(request_host: str, settings: Settings) -> tuple[str, ...]:
    public = urlsplit(settings.public_base).netloc
    return (request_host, public) if public else (request_host,)
