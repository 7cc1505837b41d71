"""Whatever body a PiAPI webhook brings, the receiver never answers 5xx (property-based).

Generated bodies are POSTed over real HTTP (werkzeug's server in a thread, running
``webhooks.create_app()``) to the per-job endpoint, with and without the job's secret,
and to the global endpoint, on PostgreSQL — which refuses NUL in text, non-finite
numbers in JSONB, and cannot encode a lone surrogate. The bodies are raw text: PiAPI
envelopes with wrong types, non-finite numbers (``NaN``, ``Infinity``, ``1e400``),
``\\u0000`` and lone ``\\ud800`` escapes, huge and foreign task ids; any JSON; JSON
nested deeper than the parser goes; truncated JSON; bytes that are not JSON; bodies over
1 MiB. Every answer is a documented one (200, 400, 401, 404, 409, 413); a refused
delivery — and any delivery without the right secret — leaves the job's row and
events byte for byte as they were.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.serving import make_server

from tests.conftest import Configure
from tests.webhook_support import (
    GLOBAL_SECRET,
    HEADER,
    SECRET,
    insert_job,
    picture,
    raw,
    raw_json,
)
from webhooks import MAX_BODY_BYTES, create_app
from worker.models import utcnow

pytestmark = pytest.mark.services

PER_JOB_EXAMPLES = 300
GLOBAL_EXAMPLES = 150
DOCUMENTED = {200, 400, 401, 404, 409, 413}
OWNED = "t-owned-by-another-job"  # the task id of a job that is never the one posted to
OWN = "@@own-task-id@@"  # written in a body, replaced by the posted job's own task id
SETTINGS = settings(
    max_examples=PER_JOB_EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the working tree
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

# --- what a body is made of ---------------------------------------------------------------

# Any character, NUL and lone surrogates included (json.dumps writes them as \u escapes).
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)
NASTY_TEXT = st.one_of(
    ANY_TEXT,
    st.lists(
        st.sampled_from(
            ["\x00", "\ud800", "\udfff", "\ud83d\ude00", "\ufffd", "\u2028", "\\", '"', "é", "a"]
        ),
        max_size=12,
    ).map("".join),
)
RAW_NUMBERS = st.sampled_from(
    ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0", "9" * 400, "-" + "9" * 30]
).map(raw)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    NASTY_TEXT,
    RAW_NUMBERS,
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NASTY_TEXT, inner, max_size=4),
    max_leaves=12,
)
STATUSES = st.one_of(
    st.sampled_from(["pending", "staged", "processing", "completed", "failed", " Completed "]),
    st.sampled_from(["completed", "failed", "processing"]).map(lambda s: s + "\x00"),
    NASTY_TEXT,
    JSON,
)
NUMBERS = st.one_of(st.integers(-1000, 1000), st.floats(), RAW_NUMBERS, JSON)
URLS = st.one_of(
    st.just("https://cdn.piapi.test/1.png"),
    st.builds(lambda t: f"https://cdn.piapi.test/{t}.png", NASTY_TEXT),
    st.integers(4000, 6000).map(lambda n: "https://cdn.test/" + "x" * n),
    JSON,
)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of ``choices``, each drawn about as often as its weight says (the first one a
    little more: integers() leans to its bounds, so the first choice is at both ends)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    table.append(table[0])
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


TASK_IDS = weighted(
    (8, st.just(OWN)),  # the posted job's own task (the global endpoint finds it)
    (2, st.just(OWNED)),  # another job's task
    (2, st.just("t-nobody-follows")),
    (2, st.sampled_from(["", " ", "\x00", "\ud800", "t-1\x00", OWNED + "\udfff"])),
    (2, st.integers(250, 260).map(lambda n: "t" * n)),  # around the column's 255
    (1, st.integers(1000, 300_000).map(lambda n: "t" * n)),
    (2, NASTY_TEXT),
    (1, JSON),
)


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A PiAPI webhook body, each part right, wrong, missing or poisoned."""
    output: Any = {
        "progress": draw(NUMBERS),
        "task_progress": draw(NUMBERS),
        "image_urls": draw(st.one_of(st.lists(URLS, max_size=5), JSON)),
        "temporary_image_urls": draw(st.one_of(st.lists(URLS, max_size=3), JSON)),
        "image_url": draw(URLS),
    }
    error: Any = {"message": draw(NASTY_TEXT | JSON), "raw_message": draw(NASTY_TEXT | JSON)}
    data: Any = {
        "task_id": draw(TASK_IDS),
        "status": draw(STATUSES),
        "output": draw(st.sampled_from([output, output, None, "output"])),
        "error": draw(st.sampled_from([error, error, None, []])),
        **draw(st.dictionaries(NASTY_TEXT, JSON, max_size=3)),
    }
    for key in draw(st.sets(st.sampled_from(list(data)), max_size=2)):
        del data[key]  # a part missing
    body: Any = {"timestamp": draw(st.one_of(st.integers(), JSON)), "data": data}
    return draw(st.sampled_from([body, body, body, body, data, {"data": data}, [body]]))


@dataclass(frozen=True)
class Body:
    kind: str
    text: bytes


@st.composite
def bodies(draw: st.DrawFn) -> Body:
    kind = draw(
        weighted(
            (10, st.just("envelope")),
            *((1, st.just(k)) for k in ("json", "deep", "deep-inside", "bytes", "truncated")),
            (1, st.just("too-large")),
        )
    )
    if kind == "envelope":
        text = raw_json(draw(envelopes()))
    elif kind == "json":
        text = raw_json(draw(JSON))
    elif kind in ("deep", "deep-inside"):
        depth = draw(st.integers(900, 200_000))
        opening, closing = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        nested = opening * depth + "1" + closing * depth
        if kind == "deep-inside":
            text = f'{{"timestamp": 1, "data": {{"task_id": "{OWN}", "status": {nested}}}}}'
        else:
            text = nested
    elif kind == "bytes":
        return Body(kind, draw(st.binary(max_size=2000)))
    elif kind == "truncated":
        whole = raw_json(draw(envelopes()))
        text = whole[: draw(st.integers(0, max(0, len(whole) - 1)))]
    else:
        envelope = draw(envelopes())
        text = raw_json({"pad": "x" * MAX_BODY_BYTES, "body": envelope})
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["utf-16", "utf-32", "utf-8-sig"]))
    return Body(kind, text.encode(encoding))


# --- the running app ----------------------------------------------------------------------


@pytest.fixture
def web(pg_url: str, configure: Configure) -> Iterator[httpx.Client]:
    """The web app over real HTTP on PostgreSQL, with the global endpoint's secret set."""
    configure(piapi_webhook_secret=GLOBAL_SECRET)
    server = make_server("127.0.0.1", 0, create_app(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.server_port}", timeout=60) as client:
            yield client
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def owner(web: httpx.Client) -> uuid.UUID:
    """A job following OWNED: no delivery to another job may touch it or adopt its task."""
    return insert_job(upstream_task_id=OWNED)


STATES: dict[str, dict[str, Any]] = {
    "submitted": {},
    "processing": {"status": "processing", "progress": 35},
    "adopting": {  # its create call's answer was lost: the first webhook names its task
        "status": "queued",
        "upstream_task_id": None,
        "submitted_at": None,
        "claim_token": "tok",
        "claimed_until": utcnow() + timedelta(days=1),
    },
    "completed": {
        "status": "completed",
        "progress": 100,
        "result_urls": ["https://cdn.piapi.test/1.png"],
        "completed_at": utcnow(),
    },
}
WRONG_SECRETS = [None, "", "wrong", SECRET + "x", SECRET.upper(), "x" + SECRET, GLOBAL_SECRET]


def new_job(state: str) -> tuple[uuid.UUID, str]:
    task_id = f"t-{uuid.uuid4().hex}"
    fields = {"upstream_task_id": task_id, **STATES[state]}
    return insert_job(**fields), task_id


def send(
    web: httpx.Client, path: str, body: Body, own_task_id: str, secret: str | None
) -> httpx.Response:
    content = body.text.replace(OWN.encode(), own_task_id.encode())
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers[HEADER] = secret
    return web.post(path, content=content, headers=headers)


def check_documented(answer: httpx.Response, body: Body) -> None:
    assert answer.status_code < 500, (body.kind, answer.status_code, answer.text[:500])
    assert answer.status_code in DOCUMENTED, (body.kind, answer.status_code, answer.text[:500])
    if len(body.text) > MAX_BODY_BYTES:
        assert answer.status_code == 413


# --- the properties -----------------------------------------------------------------------


class Tally:
    """How many bodies were tried, by answer and by kind of body."""

    def __init__(self) -> None:
        self.answers: Counter[int] = Counter()
        self.kinds: Counter[str] = Counter()

    def add(self, body: Body, answer: httpx.Response) -> None:
        self.answers[answer.status_code] += 1
        self.kinds[body.kind] += 1

    def report(self, endpoint: str) -> int:
        total = sum(self.answers.values())
        print(
            f"\n{endpoint}: {total} bodies tried; by answer {dict(sorted(self.answers.items()))};"
            f" by kind {dict(sorted(self.kinds.items()))}"
        )
        return total


def refused_by_the_database(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the receiver's last line of defence caught: a value storable() let through."""
    return [r.getMessage() for r in caplog.records if "database refused" in r.getMessage()]


def test_per_job_endpoint_never_answers_5xx(
    web: httpx.Client, owner: uuid.UUID, caplog: pytest.LogCaptureFixture
) -> None:
    right, wrong = Tally(), Tally()

    @SETTINGS
    @given(
        body=bodies(),
        state=st.sampled_from(list(STATES)),
        secret=st.sampled_from([SECRET, SECRET, *WRONG_SECRETS]),
    )
    def deliver(body: Body, state: str, secret: str | None) -> None:
        job_id, task_id = new_job(state)
        before = picture(job_id), picture(owner)
        answer = send(web, f"/webhooks/piapi/{job_id}", body, task_id, secret)
        (right if secret == SECRET else wrong).add(body, answer)
        check_documented(answer, body)
        if secret != SECRET:
            assert answer.status_code in (401, 413)
        if answer.status_code == 200:
            assert answer.json()["job_id"] == str(job_id)
            assert answer.json()["outcome"] in ("transition", "progress", "ignored")
            assert picture(owner) == before[1]
        else:  # refused (or unauthenticated): nothing written
            assert answer.status_code != 404
            assert (picture(job_id), picture(owner)) == before

    deliver()
    tried = right.report("per-job, right secret") + wrong.report("per-job, wrong secret")
    assert tried >= PER_JOB_EXAMPLES
    assert refused_by_the_database(caplog) == []


def test_global_endpoint_never_answers_5xx(
    web: httpx.Client, owner: uuid.UUID, caplog: pytest.LogCaptureFixture
) -> None:
    right, wrong = Tally(), Tally()

    @settings(SETTINGS, max_examples=GLOBAL_EXAMPLES)
    @given(
        body=bodies(),
        state=st.sampled_from(["submitted", "processing", "completed"]),
        secret=st.sampled_from([GLOBAL_SECRET, GLOBAL_SECRET, GLOBAL_SECRET, None, "x", SECRET]),
    )
    def deliver(body: Body, state: str, secret: str | None) -> None:
        job_id, task_id = new_job(state)
        before = picture(job_id), picture(owner)
        answer = send(web, "/webhooks/piapi", body, task_id, secret)
        (right if secret == GLOBAL_SECRET else wrong).add(body, answer)
        check_documented(answer, body)
        if secret != GLOBAL_SECRET:
            assert answer.status_code in (401, 413)
        if answer.status_code == 200:  # the job of the task it names (the owner's, or ours)
            assert answer.json()["job_id"] in (str(job_id), str(owner))
        else:
            assert (picture(job_id), picture(owner)) == before

    deliver()
    tried = right.report("global, right secret") + wrong.report("global, wrong secret")
    assert tried >= GLOBAL_EXAMPLES
    assert refused_by_the_database(caplog) == []
