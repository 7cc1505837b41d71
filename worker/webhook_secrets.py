"""Per-job webhook secrets: only a hash is stored, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac


def hash_secret(secret: str) -> str:
    # The secrets are 256 random bits: a plain SHA-256 is enough (no guessing to slow down).
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(given: str | None, expected_hash: str | None) -> bool:
    if not given or not expected_hash:
        return False
    return hmac.compare_digest(hash_secret(given), expected_hash)
