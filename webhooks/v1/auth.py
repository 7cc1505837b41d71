"""Bearer tokens for /v1: who is calling, and which jobs they may see.

A token is looked up by the SHA-256 of its secret (worker/tokens.py): the
database compares hashes through a unique index, so no secret is compared in
Python and no timing tells how much of one was right.
"""

from __future__ import annotations

from flask import g, request

from webhooks.context import runtime
from webhooks.problems import ProblemError
from worker import tokens
from worker.tokens import TokenInfo

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="variflow"'}


def authenticate() -> TokenInfo:
    """The caller's live token, kept in ``g`` for the request; 401 otherwise."""
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ProblemError(401, "an Authorization: Bearer token is required", headers=CHALLENGE)
    with runtime().autocommit() as session:  # one read: no BEGIN/COMMIT round trips
        token = tokens.authenticate(session, secret.strip())
    if token is None:
        raise ProblemError(401, "the token is unknown or revoked", headers=CHALLENGE)
    g.variflow_token = token
    return token


def caller() -> TokenInfo:
    token: TokenInfo = g.variflow_token
    return token


def visible_tenant() -> str | None:
    """The tenant whose jobs the caller sees: its own, or None (all) for an admin."""
    token = caller()
    return None if token.admin else token.tenant
