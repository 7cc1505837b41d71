"""submit_variation accepts only what can be stored and sent (worker/validation.py).

Every refusal is an InvalidInput naming a field, raised before anything is
stored; nothing else escapes, whatever the value. Explicit cases first (each
example of the hardening brief), then a property test per provider that throws
hostile values at every field, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import struct
import uuid
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from sqlalchemy import func, select

from worker.api import JobInfo, get_job, submit_variation
from worker.errors import InvalidInput
from worker.images import content_type, resolve_image
from worker.models import Job, JobEvent, JobInput
from worker.providers.base import InputImage
from worker.providers.lemondata import LemonDataProvider
from worker.providers.piapi import PiAPIProvider
from worker.providers.piclaza import PiclazaProvider
from worker.runtime import session_scope
from worker.validation import (
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    describe,
    http_url,
    image_header,
    json_params,
    read_image,
    safe_filename,
)

PIAPI: dict[str, Any] = {"origin_task_id": "o-1", "index": "1", "prompt": "a red fox"}
URL = "https://img.test/in.png"
# notify_url's host must be a public address (checked when submitting): a literal one
# needs no name lookup.
PUBLIC_IP = "93.184.216.34"


@pytest.fixture(autouse=True)
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hermetic: no host name resolves (an IP literal still does, without a query)."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host)
        except (ValueError, UnicodeDecodeError):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


# --- image bytes, built by Pillow or by hand ----------------------------------------------


def encoded(size: tuple[int, int], fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A PNG with a hand-built IHDR declaring any size, and at most a token of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IDAT", idat) if idat is not None else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + body + chunk(b"IEND", b"")


def jpeg_header(width: int, height: int) -> bytes:
    """SOI, a baseline frame header declaring any size, a scan with no data, EOI."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\xff\xd9"


def webp_header(width: int, height: int) -> bytes:
    """A RIFF/WEBP file whose VP8X chunk declares any canvas size, and nothing else."""
    vp8x = (
        b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    )
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


SQUARE_PNG = encoded((16, 16), "PNG")
WIDE_PNG = encoded((32, 16), "PNG")
SMALL_JPEG = encoded((24, 16), "JPEG")
SMALL_WEBP = encoded((20, 12), "WEBP")
BOMB = png_header(30000, 30000, zlib.compress(b"\x00" * 64))  # ~100 bytes, 900 MP declared
HEADER_ONLY = png_header(12000, 12000)


# --- helpers --------------------------------------------------------------------------------


def counts() -> tuple[int, int, int]:
    with session_scope() as session:
        return (
            int(session.scalar(select(func.count()).select_from(Job)) or 0),
            int(session.scalar(select(func.count()).select_from(JobEvent)) or 0),
            int(session.scalar(select(func.count()).select_from(JobInput)) or 0),
        )


def refused(provider: Any, field: str, **kwargs: Any) -> InvalidInput:
    """submit_variation refuses with InvalidInput naming ``field`` and stores nothing."""
    before = counts()
    with pytest.raises(InvalidInput) as info:
        submit_variation(provider, **kwargs)
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(f"{field}: "), str(info.value)
    assert isinstance(info.value, ValueError)
    assert counts() == before
    return info.value


# --- explicit cases: one per example of the brief, and their neighbours ---------------------

Factory = Callable[[Path], dict[str, Any]]


def fixed(**kwargs: Any) -> Factory:
    return lambda _tmp: kwargs


def file_of(data: bytes, name: str = "in.png", **extra: Any) -> Factory:
    def build(tmp: Path) -> dict[str, Any]:
        path = tmp / name
        path.write_bytes(data)
        return {"image": path, **extra}

    return build


CASES: list[tuple[str, Any, Factory, str]] = [
    # NUL bytes and lone surrogates: a ValueError, not a database error.
    ("prompt-nul", "piapi", fixed(**{**PIAPI, "prompt": "a red\x00 fox"}), "prompt"),
    ("prompt-surrogate", "piapi", fixed(**{**PIAPI, "prompt": "a red \ud800 fox"}), "prompt"),
    ("prompt-low-surrogate", "piapi", fixed(**{**PIAPI, "prompt": "\udc80"}), "prompt"),
    ("prompt-too-long", "piapi", fixed(**{**PIAPI, "prompt": "p" * 4001}), "prompt"),
    ("origin-nul", "piapi", fixed(**{**PIAPI, "origin_task_id": "o\x00"}), "origin_task_id"),
    ("origin-too-long", "piapi", fixed(**{**PIAPI, "origin_task_id": "o" * 256}), "origin_task_id"),
    ("key-nul", "piapi", fixed(**PIAPI, idempotency_key="k\x00"), "idempotency_key"),
    ("key-surrogate", "piapi", fixed(**PIAPI, idempotency_key="k\udfff"), "idempotency_key"),
    ("key-int", "piapi", fixed(**PIAPI, idempotency_key=5), "idempotency_key"),
    ("key-bytes", "piapi", fixed(**PIAPI, idempotency_key=b"k"), "idempotency_key"),
    ("user-nul", "lemondata", fixed(image=SQUARE_PNG, user="u\x00"), "user"),
    ("user-surrogate", "lemondata", fixed(image=SQUARE_PNG, user="\ud83d"), "user"),
    ("user-too-long", "lemondata", fixed(image=SQUARE_PNG, user="u" * 256), "user"),
    ("user-int", "lemondata", fixed(image=SQUARE_PNG, user=5), "user"),
    ("url-nul", "piclaza", fixed(image_url="https://img.test/a\x00.png"), "image_url"),
    ("url-surrogate", "piclaza", fixed(image_url="https://img.test/\ud800.png"), "image_url"),
    ("image-url-nul", "piclaza", fixed(image="https://img.test/a\x00.png"), "image"),
    ("notify-nul", "piapi", fixed(**PIAPI, notify_url="https://app.test/\x00"), "notify_url"),
    (
        "notify-surrogate",
        "piapi",
        fixed(**PIAPI, notify_url="https://app.test/\udc00"),
        "notify_url",
    ),
    # Longer than their columns.
    (
        "notify-2049",
        "piapi",
        fixed(**PIAPI, notify_url=f"https://a.test/{'n' * 2034}"),
        "notify_url",
    ),
    ("task-256", "piapi", fixed(**PIAPI, on_complete_task="t" * 256), "on_complete_task"),
    ("url-2049", "piclaza", fixed(image_url=f"https://a.test/{'u' * 2034}"), "image_url"),
    # image_url values Piclaza used to forward verbatim.
    ("url-int", "piclaza", fixed(image_url=123), "image_url"),
    ("url-none", "piclaza", fixed(image_url=None), "image_url"),
    ("url-empty", "piclaza", fixed(image_url=""), "image_url"),
    ("url-file", "piclaza", fixed(image_url="file:///etc/passwd"), "image_url"),
    ("url-gopher", "piclaza", fixed(image_url="gopher://img.test/1"), "image_url"),
    ("url-javascript", "piclaza", fixed(image_url="javascript:alert(1)"), "image_url"),
    ("url-no-host", "piclaza", fixed(image_url="https:///in.png"), "image_url"),
    ("url-bad-ipv6", "piclaza", fixed(image_url="http://[::1/in.png"), "image_url"),
    ("url-bad-port", "piclaza", fixed(image_url="http://img.test:99999/in.png"), "image_url"),
    ("url-space", "piclaza", fixed(image_url="https://img.test/a b.png"), "image_url"),
    ("url-newline", "piclaza", fixed(image_url="https://img.test/a.png\n"), "image_url"),
    ("lemon-url-file", "lemondata", fixed(image_url="file:///etc/passwd"), "image_url"),
    ("lemon-url-none", "lemondata", fixed(image_url=None), "image_url"),
    ("image-gopher", "piclaza", fixed(image="gopher://img.test/1"), "image"),
    ("image-javascript", "piclaza", fixed(image="javascript:alert(1)"), "image"),
    ("image-http-no-host", "piclaza", fixed(image="http:in.png"), "image"),
    ("image-int", "piclaza", fixed(image=123), "image"),
    ("image-memoryview", "piclaza", fixed(image=memoryview(SQUARE_PNG)), "image"),
    ("image-long-path", "piclaza", fixed(image="x" * 5000), "image"),
    ("image-nul-path", "piclaza", fixed(image="in\x00.png"), "image"),
    # Piclaza image bytes are checked: a text file is not an image.
    ("piclaza-text-bytes", "piclaza", fixed(image=b"hello, I am text\n"), "image"),
    ("piclaza-text-file", "piclaza", file_of(b"hello, I am text\n", "notes.txt"), "image"),
    ("piclaza-gif", "piclaza", fixed(image=encoded((8, 8), "GIF")), "image"),
    ("piclaza-truncated-jpeg", "piclaza", fixed(image=SMALL_JPEG[:120]), "image"),
    # A 100-byte PNG declaring 30000x30000: refused from its header, never decoded.
    ("piclaza-bomb", "piclaza", fixed(image=BOMB), "image"),
    ("piclaza-bomb-file", "piclaza", file_of(BOMB), "image"),
    ("lemon-bomb", "lemondata", fixed(image=png_header(30000, 30000, b"x")), "image"),
    # A header-only 12000x12000 PNG is refused, not sent.
    ("piclaza-header-only", "piclaza", fixed(image=HEADER_ONLY), "image"),
    ("piclaza-header-only-small", "piclaza", fixed(image=png_header(64, 64)), "image"),
    ("lemon-header-only", "lemondata", fixed(image=png_header(1024, 1024)), "image"),
    ("piclaza-jpeg-huge", "piclaza", fixed(image=jpeg_header(60000, 60000)), "image"),
    ("piclaza-webp-huge", "piclaza", fixed(image=webp_header(16000, 16000)), "image"),
    ("piclaza-side-over", "piclaza", fixed(image=png_header(MAX_IMAGE_SIDE + 1, 8)), "image"),
    # n: a field name on every error ("²" passes str.isdigit but not int()).
    ("n-superscript", "lemondata", fixed(image=SQUARE_PNG, n="²"), "n"),
    ("n-arabic-digit", "lemondata", fixed(image=SQUARE_PNG, n="٣"), "n"),
    ("n-many-digits", "lemondata", fixed(image=SQUARE_PNG, n="9" * 5000), "n"),
    ("n-huge-int", "lemondata", fixed(image=SQUARE_PNG, n=10**5000), "n"),
    ("lemon-jpeg", "lemondata", fixed(image=SMALL_JPEG), "image"),
    ("lemon-wide", "lemondata", fixed(image=WIDE_PNG), "image"),
    ("lemon-size-list", "lemondata", fixed(image=SQUARE_PNG, size=["256x256"]), "size"),
    ("lemon-model-none", "lemondata", fixed(image=SQUARE_PNG, model=None), "model"),
    # provider, types, deadline.
    ("provider-none", None, fixed(**PIAPI), "provider"),
    ("provider-int", 5, fixed(**PIAPI), "provider"),
    ("provider-huge-int", 10**5000, fixed(**PIAPI), "provider"),
    ("provider-nul", "piapi\x00", fixed(**PIAPI), "provider"),
    ("provider-surrogate", "\ud800", fixed(**PIAPI), "provider"),
    ("provider-long", "p" * 100_000, fixed(**PIAPI), "provider"),
    ("notify-bytes", "piapi", fixed(**PIAPI, notify_url=b"x"), "notify_url"),
    ("notify-ftp", "piapi", fixed(**PIAPI, notify_url="ftp://app.test/x"), "notify_url"),
    ("notify-no-host", "piapi", fixed(**PIAPI, notify_url="https://"), "notify_url"),
    ("task-bytes", "piapi", fixed(**PIAPI, on_complete_task=b"t"), "on_complete_task"),
    ("task-nul", "piapi", fixed(**PIAPI, on_complete_task="app.done\x00"), "on_complete_task"),
    ("index-huge-int", "piapi", fixed(**{**PIAPI, "index": 10**5000}), "index"),
    ("index-list", "piapi", fixed(**{**PIAPI, "index": ["1"]}), "index"),
    ("ratio-arabic", "piapi", fixed(**PIAPI, aspect_ratio="١٦:٩"), "aspect_ratio"),
    ("service-mode-list", "piapi", fixed(**PIAPI, service_mode=[""]), "service_mode"),
    ("unknown-nul-name", "piapi", fixed(**PIAPI, **{"x\x00": 1}), "params"),
    ("image-name-nul", "piclaza", fixed(image=SQUARE_PNG, image_name="a\x00.png"), "image_name"),
    (
        "deadline-overflow",
        "piapi",
        fixed(**PIAPI, deadline=datetime.max.replace(tzinfo=timezone(timedelta(hours=-5)))),
        "deadline",
    ),
    ("deadline-none-offset", "piapi", fixed(**PIAPI, deadline=datetime.max), "deadline"),
    ("deadline-huge-int", "piapi", fixed(**PIAPI, deadline=10**400), "deadline"),
    ("deadline-max-timedelta", "piapi", fixed(**PIAPI, deadline=timedelta.max), "deadline"),
]


@pytest.mark.parametrize(
    ("provider", "make", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_invalid_input_naming_the_field(
    sqlite_url: str, tmp_path: Path, provider: Any, make: Factory, field: str
) -> None:
    submit_variation("piapi", **PIAPI, idempotency_key="existing")  # a row that must stay alone
    refused(provider, field, **make(tmp_path))


def test_the_bomb_never_reaches_pillow_decoding() -> None:
    assert len(BOMB) < 120
    assert image_header(BOMB) == ("PNG", 30000, 30000)
    with pytest.raises(InvalidInput, match=r"^image: 30000x30000 pixels is over the limit"):
        read_image("image", BOMB)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (SQUARE_PNG, ("PNG", 16, 16)),
        (SMALL_JPEG, ("JPEG", 24, 16)),
        (SMALL_WEBP, ("WEBP", 20, 12)),
        (encoded((20, 12), "WEBP", lossless=True), ("WEBP", 20, 12)),
        (encoded((20, 12), "JPEG", progressive=True), ("JPEG", 20, 12)),
        (png_header(7, 9), ("PNG", 7, 9)),
        (jpeg_header(70, 90), ("JPEG", 70, 90)),
        (webp_header(300, 200), ("WEBP", 300, 200)),
        (b"GIF89a", None),
        (b"\x89PNG\r\n\x1a\n", None),
        (b"\xff\xd8\xff" + b"\xff" * 10_000, None),
    ],
    ids=[
        "png",
        "jpeg",
        "webp",
        "webp-lossless",
        "jpeg-progressive",
        "png-hand",
        "jpeg-hand",
        "webp-hand",
        "gif",
        "png-magic-only",
        "jpeg-fill-bytes",
    ],
)
def test_the_header_gives_the_size(data: bytes, expected: tuple[str, int, int] | None) -> None:
    assert image_header(data) == expected


def test_the_largest_accepted_image_decodes() -> None:
    side = int(MAX_IMAGE_PIXELS**0.5)
    assert read_image("image", encoded((side, side), "PNG")) == ("PNG", side, side)
    wide = encoded((MAX_IMAGE_SIDE, MAX_IMAGE_PIXELS // MAX_IMAGE_SIDE), "PNG")
    assert read_image("image", wide)[1] == MAX_IMAGE_SIDE
    with pytest.raises(InvalidInput, match="over the limit"):
        read_image("image", png_header(side + 1, side))


def test_downloaded_bytes_for_lemondata_go_through_validate() -> None:
    # What the worker fetches from an image URL is checked by adapter.validate().
    with httpx.Client() as client:
        adapter = LemonDataProvider(client, "https://lemon.test", "key")
    for data in (BOMB, HEADER_ONLY, b"<html>not an image</html>", SMALL_JPEG, WIDE_PNG):
        with pytest.raises(InvalidInput) as info:
            adapter.validate({}, InputImage(data, "in.png", content_type(data)))
        assert info.value.field == "image"
    assert adapter.validate({}, InputImage(SQUARE_PNG, "in.png"))["n"] == 1


def test_piclaza_checks_the_bytes_it_is_given() -> None:
    with httpx.Client() as client:
        adapter = PiclazaProvider(client, "https://piclaza.test", "key")
    for data in (SQUARE_PNG, SMALL_JPEG, SMALL_WEBP):
        assert adapter.validate({}, InputImage(data, "in", content_type(data))) == {}
    for data in (b"text", BOMB, HEADER_ONLY, encoded((8, 8), "BMP")):
        with pytest.raises(InvalidInput, match=r"^image: "):
            adapter.validate({}, InputImage(data, "in"))


def test_piapi_index_and_ratio_are_ascii() -> None:
    with httpx.Client() as client:
        adapter = PiAPIProvider(client, "https://piapi.test", "key")
    assert adapter.validate({**PIAPI, "index": 3, "aspect_ratio": "16:9"})["index"] == "3"
    with pytest.raises(InvalidInput, match=r"^index: .*an integer of about"):
        adapter.validate({**PIAPI, "index": 10**5000})


# --- what is accepted is stored as given --------------------------------------------------


def test_good_images_of_every_accepted_type_are_stored(sqlite_url: str, tmp_path: Path) -> None:
    for data, kind in (
        (SQUARE_PNG, "image/png"),
        (SMALL_JPEG, "image/jpeg"),
        (SMALL_WEBP, "image/webp"),
    ):
        job = submit_variation("piclaza", image=data)
        assert job.params == {}
        with session_scope() as session:
            stored = session.get(JobInput, job.id)
            assert stored is not None
            assert (stored.content, stored.content_type) == (data, kind)
    job = submit_variation("lemondata", image=SQUARE_PNG, n="2", user="ü-user")
    assert job.params == {"n": 2, "size": "1024x1024", "response_format": "url", "user": "ü-user"}


def test_a_file_name_that_cannot_be_stored_is_replaced(sqlite_url: str, tmp_path: Path) -> None:
    # A POSIX file name that is not UTF-8 reads as a lone surrogate (surrogateescape).
    path = tmp_path / "\udcff.jpg"
    path.write_bytes(SMALL_JPEG)
    job = submit_variation("piclaza", image=path)
    with session_scope() as session:
        stored = session.get(JobInput, job.id)
        assert stored is not None
        assert stored.filename == "image.jpg"
    assert safe_filename("a\ud800.png") == "image.png"
    assert safe_filename("a\x07.png", "x") == "x"
    assert safe_filename("plain name.png") == "plain name.png"


def test_urls_are_kept_as_given(sqlite_url: str) -> None:
    url = "https://img.test/dir/ünïcode.png?x=1#f"
    assert submit_variation("piclaza", image_url=url).params == {"image_url": url}
    assert submit_variation("piclaza", image=url).params == {"image_url": url}
    job = submit_variation(
        "piapi",
        **PIAPI,
        notify_url=f"http://{PUBLIC_IP}:8080/hook",
        on_complete_task="app.tasks.done",
        deadline=datetime.now(timezone(timedelta(hours=5))) + timedelta(minutes=5),
    )
    assert job.deadline.tzinfo is not None
    assert http_url("f", "HTTPS://Host.Test") == "HTTPS://Host.Test"


def test_resolve_image_reads_at_most_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(SQUARE_PNG + b"\x00" * 100)
    with pytest.raises(InvalidInput, match=r"^image: .*over the limit"):
        resolve_image(path, len(SQUARE_PNG))
    assert resolve_image(URL, 10) == (URL, None)


def test_json_params_names_the_top_level_key() -> None:
    json_params({"a": {"b": ["ok", 1, 2.5, None, True]}})
    bad: list[tuple[dict[str, Any], str]] = [
        ({"a": {"b": ["\x00"]}}, "a"),
        ({"a": [{"k\ud800": 1}]}, "a"),
        ({"a": float("nan")}, "a"),
        ({"a": 2**64}, "a"),
        ({"a": b"bytes"}, "a"),
        ({"a": ("tuple",)}, "a"),
        ({"a": "x" * (64 * 1024 + 1)}, "a"),
        ({"a": {1: "int key"}}, "a"),
        ({"\x00": 1}, "params"),
    ]
    nested: Any = "deep"
    for _ in range(40):
        nested = [nested]
    bad.append(({"deep": nested}, "deep"))
    for params, field in bad:
        with pytest.raises(InvalidInput) as info:
            json_params(params)
        assert info.value.field == field


def test_describe_is_short_and_safe() -> None:
    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert describe(Hostile()) == "a Hostile"
    assert len(describe("x" * 10_000)) == 60
    assert "bits" in describe(10**5000)


# --- the property: hostile values for every field of every provider ------------------------

NASTY_CHARS = st.sampled_from(["\x00", "\ud800", "\udfff", "\udc80", "\ud83d"])
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates too
GOOD_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
HOSTILE_TEXT = st.one_of(
    ANY_TEXT,
    st.builds(lambda a, bad, b: a + bad + b, ANY_TEXT, NASTY_CHARS, ANY_TEXT),
    st.builds(
        lambda c, n: c * n,
        st.sampled_from(["a", "é", " ", "\x00", "😀"]),
        st.sampled_from([0, 1, 32, 33, 254, 255, 256, 2047, 2048, 2049, 4000, 4001, 70_000]),
    ),
)
WRONG_TYPES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.just(10**5000),
    st.floats(),
    st.binary(max_size=16),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.builds(object),
    st.just(memoryview(b"x")),
)
HOSTILE = st.one_of(HOSTILE_TEXT, WRONG_TYPES)
ODD_URLS = st.one_of(
    st.sampled_from(
        [
            URL,
            "http://127.0.0.1:8000/x.png",
            "HTTPS://Example.COM/a.png",
            "https://ex\u00e4mple.test/\u00fc.png",
            "file:///etc/passwd",
            "gopher://img.test/1",
            "javascript:alert(1)",
            "data:image/png;base64,AAAA",
            "",
            "http://",
            "https://:80/",
            "http://[::1",
            "http://[::1]:8080/x",
            "http://h:99999/",
            "http://h:-1/",
            "http:x",
            "//img.test/x",
            " https://img.test/x",
            "https://img.test/x\n",
            "https://img.test/\t",
            "https://img.test/\x00",
            "https://img.test/\ud800",
            "https://u:p@img.test/x",
            "https://img.test/" + "a" * 2031,
            "https://img.test/" + "a" * 2032,
        ]
    ),
    st.builds(
        lambda scheme, host, path: f"{scheme}://{host}/{path}",
        st.sampled_from(["http", "https", "HTTP", "ftp", "file", "", "javascript"]),
        ANY_TEXT,
        ANY_TEXT,
    ),
    HOSTILE,
)
DIMENSIONS = st.one_of(
    st.integers(0, 64),
    st.integers(0, 2**32 - 1),
    st.sampled_from([MAX_IMAGE_SIDE, MAX_IMAGE_SIDE + 1, 4096, 4097, 30000, 65535]),
)
CRAFTED_IMAGES = st.one_of(
    st.builds(png_header, DIMENSIONS, DIMENSIONS, st.one_of(st.none(), st.binary(max_size=40))),
    st.builds(
        png_header,
        DIMENSIONS,
        DIMENSIONS,
        st.binary(max_size=40).map(lambda raw: zlib.compress(raw)),
    ),
    st.builds(jpeg_header, st.integers(0, 65535), st.integers(0, 65535)),
    st.builds(webp_header, st.integers(1, 2**24), st.integers(1, 2**24)),
    st.builds(
        lambda head, tail: head + tail,
        st.sampled_from([SQUARE_PNG, SMALL_JPEG, SMALL_WEBP]),
        st.binary(max_size=20),
    ),
    st.builds(
        lambda data, cut: data[:cut],
        st.sampled_from([SQUARE_PNG, SMALL_JPEG, SMALL_WEBP]),
        st.integers(0, 400),
    ),
    st.binary(max_size=300),
)
FILE_NAMES = st.sampled_from(["in.png", "in put.jpg", "\udcff.png", "a" * 240 + ".png", "x"])


FRESH_KEY = object()  # an idempotency key never used before, made when the example runs


class OnDisk:
    """An image given as a path: written to the test's folder when the example runs."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data, self.name = data, name

    def __repr__(self) -> str:
        return f"OnDisk({self.data[:16]!r}..., {self.name!r})"


def good_images(valid: list[bytes]) -> st.SearchStrategy[Any]:
    good = st.sampled_from(valid)
    return st.one_of(good, st.builds(OnDisk, good, FILE_NAMES), st.just(URL))


def images(valid: list[bytes]) -> st.SearchStrategy[Any]:
    return st.one_of(
        good_images(valid),
        CRAFTED_IMAGES,
        st.builds(OnDisk, CRAFTED_IMAGES, FILE_NAMES),
        ODD_URLS,
        WRONG_TYPES,
        st.sampled_from(["/no/such/file.png", "in\x00.png", "x" * 5000]),
    )


LEMON_IMAGES = [SQUARE_PNG, encoded((8, 8), "PNG"), encoded((64, 64), "PNG", optimize=True)]
PICLAZA_IMAGES = [SQUARE_PNG, WIDE_PNG, SMALL_JPEG, SMALL_WEBP]
FUTURE = st.datetimes(
    min_value=datetime(2100, 1, 1), max_value=datetime(9000, 1, 1), timezones=st.just(UTC)
)
OFFSETS = st.builds(
    timezone, st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23))
)

# field -> (valid values, hostile values, optional?)
Spec = dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any], bool]]
COMMON: Spec = {
    # Mostly a fresh key (hypothesis repeats drawn values), sometimes one used before.
    "idempotency_key": (
        st.sampled_from([FRESH_KEY, FRESH_KEY, FRESH_KEY, "order-1"]),
        st.one_of(HOSTILE, st.just("")),
        True,
    ),
    "deadline": (
        st.one_of(
            st.integers(1, 10**9),
            st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(days=3650)),
            FUTURE,
        ),
        st.one_of(
            WRONG_TYPES,
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(-(10**30), 10**30),
            st.timedeltas(),
            st.datetimes(timezones=st.one_of(st.none(), OFFSETS)),
            st.text(max_size=5),
        ),
        True,
    ),
    "notify_url": (st.just(f"https://{PUBLIC_IP}/hook"), ODD_URLS, True),
    "on_complete_task": (st.just("app.tasks.done"), HOSTILE, True),
}
SPECS: dict[str, Spec] = {
    "piapi": {
        "origin_task_id": (st.from_regex(r"[a-z0-9-]{1,40}", fullmatch=True), HOSTILE, False),
        "index": (st.sampled_from(["1", "2", "3", "4", "high_variation", 1, 4]), HOSTILE, False),
        "prompt": (GOOD_TEXT.filter(str.strip), HOSTILE, False),
        "aspect_ratio": (st.from_regex(r"[0-9]{1,3}:[0-9]{1,3}", fullmatch=True), HOSTILE, True),
        "skip_prompt_check": (st.booleans(), HOSTILE, True),
        "service_mode": (st.sampled_from(["", "public", "private"]), HOSTILE, True),
        "image": (st.nothing(), images(PICLAZA_IMAGES), True),
        "image_url": (st.nothing(), ODD_URLS, True),
        **COMMON,
    },
    "piclaza": {
        "image": (good_images(PICLAZA_IMAGES), images(PICLAZA_IMAGES), False),
        "image_url": (st.just(URL), ODD_URLS, True),
        "image_name": (st.just("cat.png"), HOSTILE, True),
        "grouping": (st.booleans(), HOSTILE, True),
        **COMMON,
    },
    "lemondata": {
        "image": (good_images(LEMON_IMAGES), images(LEMON_IMAGES), False),
        "image_url": (st.just(URL), ODD_URLS, True),
        "n": (st.one_of(st.integers(1, 10), st.sampled_from(["1", "10"])), HOSTILE, True),
        "size": (st.sampled_from(["256x256", "512x512", "1024x1024"]), HOSTILE, True),
        "response_format": (st.sampled_from(["url", "b64_json"]), HOSTILE, True),
        "user": (GOOD_TEXT, HOSTILE, True),
        "model": (st.just("dall-e-2"), HOSTILE, True),
        **COMMON,
    },
}
COMMON_FIELDS = {"provider", "params", "image", "image_url", "seed", *COMMON}
KNOWN_FIELDS = {name: COMMON_FIELDS | set(spec) for name, spec in SPECS.items()}


RARELY = st.sampled_from([False] * 19 + [True])  # hypothesis favours the first element


@st.composite
def submissions(draw: st.DrawFn, provider: str) -> tuple[Any, dict[str, Any], set[str]]:
    """(provider, keyword arguments, the fields given a hostile value)."""
    spec = SPECS[provider]
    # The image fields count three times: they have the most ways to be wrong.
    weighted = [*sorted(spec), "image", "image", "image_url"]
    hostile = draw(st.sets(st.sampled_from(weighted), max_size=2))
    kwargs: dict[str, Any] = {}
    for field, (valid, bad, optional) in spec.items():
        if field in hostile:
            kwargs[field] = draw(bad)
        elif field in ("image", "image_url"):
            continue  # one image at most, chosen below
        elif not optional or draw(st.booleans()):
            kwargs[field] = draw(valid)
    if provider != "piapi" and not {"image", "image_url"} & hostile:
        field = draw(st.sampled_from(["image", "image_url"]))
        kwargs[field] = draw(spec[field][0])
    if draw(RARELY):
        kwargs["seed"] = draw(HOSTILE)
        hostile.add("seed")
    name: Any = provider
    if draw(RARELY):
        name = draw(st.one_of(HOSTILE, st.sampled_from(["PIAPI", "nope", provider + "\x00"])))
        hostile.add("provider")
    return name, kwargs, hostile


def materialise(kwargs: dict[str, Any], folder: Path) -> dict[str, Any]:
    if kwargs.get("idempotency_key") is FRESH_KEY:
        kwargs = {**kwargs, "idempotency_key": f"key-{uuid.uuid4()}"}
    if isinstance(kwargs.get("image"), OnDisk):
        on_disk = kwargs["image"]
        folder.mkdir(exist_ok=True)
        path = folder / on_disk.name
        path.write_bytes(on_disk.data)
        kwargs = {**kwargs, "image": path}
    return kwargs


def record(outcome: str) -> None:
    """Count an outcome in hypothesis's statistics (--hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(outcome)


def check_submission(
    provider: str, drawn: tuple[Any, dict[str, Any], set[str]], folder: Path
) -> None:
    name, kwargs, hostile = drawn
    kwargs = materialise(kwargs, folder)
    before = counts()
    try:
        job = submit_variation(name, **kwargs)
    except InvalidInput as exc:
        reused = " (key already used)" if "already used" in str(exc) else ""
        record(f"refused: {exc.field}{reused}")
        assert exc.field in KNOWN_FIELDS[provider], str(exc)
        assert str(exc).startswith(f"{exc.field}: ")
        assert counts() == before
        if not hostile:
            # Only the same key for a different request may refuse good values.
            assert exc.field == "idempotency_key" and "already used" in str(exc), str(exc)
        return
    record("stored" if counts() != before else "returned the first job (idempotency key)")
    assert isinstance(job, JobInfo)
    assert get_job(job.id) == job
    after = counts()
    assert after[0] - before[0] in (0, 1)
    assert after[1] - before[1] == after[0] - before[0]


HYPOTHESIS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)


Drawn = tuple[Any, dict[str, Any], set[str]]


@pytest.mark.parametrize("provider", sorted(SPECS))
@HYPOTHESIS
@given(data=st.data())
def test_any_input_is_stored_or_refused_by_field_sqlite(
    sqlite_url: str, tmp_path: Path, provider: str, data: st.DataObject
) -> None:
    check_submission(provider, data.draw(submissions(provider)), tmp_path / "images")


@pytest.mark.services
@pytest.mark.parametrize("provider", sorted(SPECS))
@HYPOTHESIS
@given(data=st.data())
def test_any_input_is_stored_or_refused_by_field_postgresql(
    pg_url: str, tmp_path: Path, provider: str, data: st.DataObject
) -> None:
    check_submission(provider, data.draw(submissions(provider)), tmp_path / "images")


def test_every_accepted_type_given_as_a_path_with_an_undecodable_name(
    sqlite_url: str, tmp_path: Path
) -> None:
    # A fixed example of the property: good images as files named with a surrogate.
    for data in PICLAZA_IMAGES:
        drawn: Drawn = ("piclaza", {"image": OnDisk(data, "\udcff.png")}, set())
        check_submission("piclaza", drawn, tmp_path / "images")
    assert counts() == (4, 4, 4)
