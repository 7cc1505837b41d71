"""What a provider says, made safe to store: clean text, bounded sizes, finite JSON numbers.

A provider's answer or webhook body may hold anything Python's ``json`` reads,
which is more than the database takes: ``NaN``, ``Infinity`` and ``1e400``
become non-finite floats (JSONB refuses them), ``\\u0000`` becomes a NUL
character (PostgreSQL refuses it in text and in JSONB) and a lone ``\\ud800``
becomes a string that cannot be encoded as UTF-8 at all. :func:`storable`
turns an :class:`UpstreamState` into one every column and event accepts;
adapters and the webhook receiver apply it, so that such a body is stored
(cleaned) instead of failing the transaction.

A task id is the job's identity and is never rewritten: :func:`task_id_problem`
says why one cannot be stored, and a webhook naming such a task id is refused.

Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from worker.status import UpstreamState

# The widths of the columns these values land in (worker.models.Job).
MAX_TASK_ID = 255  # upstream_task_id String(255)
MAX_ERROR_CODE = 64  # error_code String(64)
# Bounds of what is kept of a provider's words (error_message is Text; the
# event payload is a small summary, not a copy of the body).
MAX_MESSAGE = 2000
MAX_URL = 2048  # as poll_url and notify_url (String(2048))
MAX_URLS = 32
MAX_PAYLOAD_TEXT = 512
MAX_PAYLOAD_ITEMS = 32
MAX_PAYLOAD_DEPTH = 4
# Integers beyond 64 bits are not numbers a payload summary needs.
_MAX_INT = 2**63

REPLACEMENT = "\ufffd"
# NUL (PostgreSQL refuses it) and surrogates (a str holds one only when it is lone:
# json joins a proper pair into one character), which UTF-8 cannot encode.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def has_unstorable(text: str) -> bool:
    """``text`` holds a NUL or a lone surrogate."""
    return _UNSTORABLE.search(text) is not None


def clean_text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, NUL and lone surrogates replaced by U+FFFD
    (``text`` itself when it is already fine)."""
    if len(text) <= limit and not has_unstorable(text):
        return text
    return _UNSTORABLE.sub(REPLACEMENT, text[:limit])


def clean_optional(text: str | None, limit: int) -> str | None:
    return clean_text(text, limit) if text is not None else None


def usable_url(url: object) -> str | None:
    """``url`` if it is a non-empty string that can be stored whole, else None.

    A URL is not cleaned: one that lost a character would point elsewhere.
    """
    if not isinstance(url, str) or not url or len(url) > MAX_URL or has_unstorable(url):
        return None
    return url


def usable_urls(urls: Iterable[object]) -> tuple[str, ...]:
    """The usable URLs among ``urls``, at most MAX_URLS of them."""
    found = []
    for url in urls:
        usable = usable_url(url)
        if usable is not None:
            found.append(usable)
            if len(found) == MAX_URLS:
                break
    return tuple(found)


def task_id_problem(task_id: str) -> str | None:
    """Why ``task_id`` cannot be stored as a job's upstream task id (None when it can)."""
    if len(task_id) > MAX_TASK_ID:
        return f"at most {MAX_TASK_ID} characters, got {len(task_id)}"
    if "\x00" in task_id:
        return "must not contain NUL"
    if has_unstorable(task_id):
        return "must be valid Unicode (no lone surrogate)"
    return None


def json_safe(value: Any, depth: int = MAX_PAYLOAD_DEPTH) -> Any:
    """A copy of ``value`` that JSONB stores: finite numbers only (others become null),
    clean and bounded strings, at most MAX_PAYLOAD_ITEMS entries per object or array
    and ``depth`` levels of them (deeper ones become null). Anything else is null."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -_MAX_INT < value < _MAX_INT else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return clean_text(value, MAX_PAYLOAD_TEXT)
    if depth <= 0:
        return None
    if isinstance(value, Mapping):
        return _safe_mapping(value, depth)
    if isinstance(value, list | tuple):
        return [json_safe(item, depth - 1) for item in value[:MAX_PAYLOAD_ITEMS]]
    return None


def _safe_mapping(value: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    safe: dict[str, Any] = {}
    for key, item in value.items():
        if len(safe) == MAX_PAYLOAD_ITEMS:
            break
        if isinstance(key, str):
            safe[clean_text(key, MAX_PAYLOAD_TEXT)] = json_safe(item, depth - 1)
    return safe


def storable(state: UpstreamState) -> UpstreamState:
    """``state`` with every value the database would refuse (or should not keep whole)
    cleaned: error code and message, result URLs, the payload summary. The task id
    is left as it is (check it with :func:`task_id_problem`)."""
    return replace(
        state,
        image_urls=usable_urls(state.image_urls),
        error_code=clean_optional(state.error_code, MAX_ERROR_CODE),
        error_message=clean_optional(state.error_message, MAX_MESSAGE),
        payload=(
            _safe_mapping(state.payload, MAX_PAYLOAD_DEPTH) if state.payload is not None else None
        ),
    )
