"""worker/upstream_text.py (what a provider says, made safe to store) and its use by the
PiAPI adapter: pure, no database."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest

from worker.errors import InvalidWebhook
from worker.providers.piapi import PiAPIProvider
from worker.status import JobStatus, Source, UpstreamState
from worker.upstream_text import (
    MAX_MESSAGE,
    MAX_PAYLOAD_DEPTH,
    MAX_PAYLOAD_ITEMS,
    MAX_PAYLOAD_TEXT,
    MAX_TASK_ID,
    MAX_URLS,
    REPLACEMENT,
    clean_text,
    json_safe,
    storable,
    task_id_problem,
    usable_url,
    usable_urls,
)

URL = "https://cdn.piapi.test/1.png"


def storable_as_json(value: Any) -> bool:
    """What PostgreSQL would take: strict JSON (no NaN), encodable as UTF-8, no NUL."""
    text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    text.encode("utf-8")
    return "\x00" not in text and "\\u0000" not in text


def test_clean_text() -> None:
    assert clean_text("fine", 10) == "fine"
    assert clean_text("a\x00b\ud800c\udfffd", 100) == f"a{REPLACEMENT}b{REPLACEMENT}c{REPLACEMENT}d"
    assert clean_text("x" * 50, 10) == "x" * 10
    assert clean_text("\U0001f600", 10) == "\U0001f600"  # a proper pair is one character


@pytest.mark.parametrize(
    ("task_id", "problem"),
    [
        ("t-1", None),
        ("t" * MAX_TASK_ID, None),
        ("t" * (MAX_TASK_ID + 1), "at most 255"),
        ("t-\x00", "NUL"),
        ("t-\ud800", "surrogate"),
        ("t-\x01\n", None),  # other control characters are stored fine
    ],
)
def test_task_id_problem(task_id: str, problem: str | None) -> None:
    found = task_id_problem(task_id)
    assert found is None if problem is None else problem in (found or "")


def test_usable_urls() -> None:
    assert usable_url(URL) == URL
    for bad in ("", None, 7, URL + "\x00", URL + "\ud800", "https://x/" + "a" * 5000):
        assert usable_url(bad) is None
    assert usable_urls([URL] * 100) == (URL,) * MAX_URLS


@pytest.mark.parametrize(
    "value",
    [
        math.nan,
        math.inf,
        -math.inf,
        10**400,
        "\x00\ud800",
        {"\x00": "\udfff"},
        [[[[[[[[1]]]]]]]],
        {str(i): i for i in range(1000)},
        list(range(1000)),
        "x" * 100_000,
        {1: "non-str key"},
        object(),
        b"bytes",
        (1.5, True, None),
    ],
)
def test_json_safe_is_always_storable(value: Any) -> None:
    safe = json_safe(value)
    assert storable_as_json(safe)
    assert len(json.dumps(safe)) < 50_000


def test_json_safe_keeps_what_is_fine() -> None:
    value = {"status": "processing", "progress": 40.5, "ok": True, "none": None, "list": [1, "a"]}
    assert json_safe(value) == value
    assert json_safe(math.nan) is None
    assert json_safe("x" * 1000) == "x" * MAX_PAYLOAD_TEXT
    assert len(json_safe(list(range(100)))) == MAX_PAYLOAD_ITEMS
    deep: Any = 1
    for _ in range(10):
        deep = [deep]
    flattened = json_safe(deep)
    for _ in range(MAX_PAYLOAD_DEPTH):
        flattened = flattened[0]
    assert flattened is None


def test_storable_cleans_all_but_the_task_id() -> None:
    state = UpstreamState(
        JobStatus.FAILED,
        Source.WEBHOOK,
        image_urls=(URL + "\x00", URL),
        error_code="c\x00" * 100,
        error_message="m\ud800" * 5000,
        upstream_task_id="t-\x00",
        payload={"progress": math.inf, "status": "\x00"},
    )
    safe = storable(state)
    assert safe.image_urls == (URL,)
    assert safe.error_code is not None
    assert len(safe.error_code) == 64
    assert REPLACEMENT in safe.error_code
    assert safe.error_message is not None
    assert len(safe.error_message) == MAX_MESSAGE
    assert "\ud800" not in safe.error_message
    assert safe.upstream_task_id == "t-\x00"  # an identity is checked, never rewritten
    assert safe.payload == {"progress": None, "status": REPLACEMENT}
    assert storable(safe) == safe
    plain = UpstreamState(JobStatus.PROCESSING, Source.POLL, progress=5, payload={"a": 1})
    assert storable(plain) == plain


# --- the PiAPI adapter ------------------------------------------------------------------


def provider() -> PiAPIProvider:
    client = httpx.Client(transport=httpx.MockTransport(lambda _r: httpx.Response(500)))
    return PiAPIProvider(client, "https://piapi.test", "key")


def data(**fields: Any) -> dict[str, Any]:
    return {"task_id": "t-1", "status": "processing", "output": {}, "error": {}, **fields}


@pytest.mark.parametrize(
    "task_id",
    ["t" * (MAX_TASK_ID + 1), "t\x00", "\x00", "t\ud800", "\udfff"],
    ids=["too-long", "nul", "only-nul", "high-surrogate", "low-surrogate"],
)
def test_parse_webhook_refuses_a_task_id_that_cannot_be_stored(task_id: str) -> None:
    with pytest.raises(InvalidWebhook, match=r"data\.task_id"):
        provider().parse_webhook({"timestamp": 1, "data": data(task_id=task_id)})


@pytest.mark.parametrize(
    ("progress", "expected"),
    [
        (10**400, 100),  # math.isfinite() would raise OverflowError on it
        (-(10**400), 0),
        (math.nan, None),
        (math.inf, None),
        (-math.inf, None),
        (True, None),
        ("50", None),
        ([50], None),
        (250, 100),
        (-5, 0),
    ],
)
def test_progress_from_any_json_value(progress: Any, expected: int | None) -> None:
    state = provider().state_from_data(data(output={"progress": progress}), Source.POLL)
    assert state.progress == expected
    assert state.payload is not None
    assert storable_as_json(dict(state.payload))


@pytest.mark.parametrize("status", [["completed"], {"a": 1}, 7, None, "completed\x00"])
def test_a_status_of_the_wrong_type_or_poisoned_is_unknown(status: Any) -> None:
    state = provider().state_from_data(data(status=status), Source.WEBHOOK)
    assert state.status is JobStatus.SUBMITTED
    assert state.payload is not None
    assert storable_as_json(dict(state.payload))


def test_an_error_message_that_is_not_text_falls_back() -> None:
    state = provider().state_from_data(
        data(status="failed", error={"message": {"nested": 1}, "raw_message": "raw"}),
        Source.WEBHOOK,
    )
    assert state.error_message == "raw"
    state = provider().state_from_data(
        data(status="failed", error={"message": ["x"], "raw_message": 5}), Source.WEBHOOK
    )
    assert state.error_message is None
