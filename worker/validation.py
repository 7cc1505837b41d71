"""Checks of application input that every layer shares: text, URLs, JSON params, image bytes.

The ground floor (it imports only ``worker.errors``, the standard library and
Pillow), so the API, the image reader and the provider adapters apply the same
rules. Every failure is an :class:`InvalidInput` naming the field; nothing here
raises anything else, whatever the value (wrong type, huge, hostile bytes).

The rules, chosen to fit the columns of worker/models.py and what a provider
can be sent:

- **Text** is a ``str`` without NUL characters (PostgreSQL refuses them in
  text and JSONB) and without lone surrogates (they cannot be encoded as
  UTF-8, so no database or HTTP body can carry them). Lengths: ids, names and
  keys up to :data:`MAX_NAME_CHARS` (255, the ``String(255)`` columns), a
  prompt up to :data:`MAX_PROMPT_CHARS`, URLs up to :data:`MAX_URL_CHARS`
  (2048, the ``String(2048)`` columns).
- **URLs** are ``http``/``https`` with a host and a valid port, and contain no
  whitespace or control character.
- **JSON params** (what an adapter's ``validate()`` returns, stored as JSON):
  strings as above (keys too), finite floats, integers within 64 bits, lists
  and string-keyed dicts nested at most :data:`MAX_JSON_DEPTH` deep, at most
  :data:`MAX_JSON_CHARS` characters of strings in all.
- **Images** are PNG, JPEG or WEBP (each adapter narrows the list). The pixel
  size is read from the file's own header by this module *before* Pillow sees
  the bytes, and capped: at most :data:`MAX_IMAGE_SIDE` pixels a side and
  :data:`MAX_IMAGE_PIXELS` pixels in all (4096 x 4096, about 16.8 MP, which is
  about 64 MiB of RGBA once decoded). Only then is the image decoded in full,
  so a decompression bomb or a header without pixel data is refused, never
  decoded.
"""

from __future__ import annotations

import io
import math
import re
import struct
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from worker.errors import InvalidInput

MAX_NAME_CHARS = 255
MAX_PROMPT_CHARS = 4000
MAX_URL_CHARS = 2048
MAX_PROVIDER_CHARS = 32  # the String(32) provider column
MAX_JSON_DEPTH = 16
MAX_JSON_CHARS = 64 * 1024
MAX_JSON_INT = 2**63 - 1
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 4096 * 4096

IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
ALL_IMAGE_FORMATS = tuple(IMAGE_TYPES)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Whitespace and control characters (C0, DEL, C1): never inside a URL.
_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f-\x9f]")
# Control characters: never inside a file name that is stored and sent.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Marker steps a JPEG may take before its frame header (real files need < 50).
_JPEG_MAX_STEPS = 4096


def describe(value: object, limit: int = 60) -> str:
    """A short, safe ``repr`` of a value for an error message (never raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**limit:
        return f"an integer of about {value.bit_length()} bits"
    try:
        shown = repr(value)
    except Exception:  # a hostile __repr__, or an int too long to print
        shown = f"a {type(value).__name__}"
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def bad_character(value: str) -> str | None:
    """What makes a string unstorable (a NUL or a lone surrogate), or None."""
    if "\x00" in value:
        return "must not contain NUL characters"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must not contain lone surrogates (not valid Unicode text)"
    return None


def text(field: str, value: object, *, max_chars: int = MAX_NAME_CHARS) -> str:
    """A string of at most ``max_chars`` characters that any database and HTTP body can carry."""
    if not isinstance(value, str):
        raise InvalidInput(field, f"must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise InvalidInput(field, f"at most {max_chars} characters, got {len(value)}")
    problem = bad_character(value)
    if problem:
        raise InvalidInput(field, problem)
    return value


def required_text(field: str, value: object, *, max_chars: int = MAX_NAME_CHARS) -> str:
    """A non-blank string, stripped, then checked as :func:`text`."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(field, "required, a non-empty string")
    return text(field, value.strip(), max_chars=max_chars)


def http_url(field: str, value: object, *, max_chars: int = MAX_URL_CHARS) -> str:
    """An http(s) URL with a host (returned as given)."""
    url = text(field, value, max_chars=max_chars)
    if _URL_FORBIDDEN.search(url):
        raise InvalidInput(field, "an http(s) URL must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        host, _port = parts.hostname, parts.port  # .port raises on a bad port
    except ValueError as exc:
        raise InvalidInput(field, f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(field, f"an http(s) URL is required, got {parts.scheme or 'no'} scheme")
    if not host:
        raise InvalidInput(field, f"{describe(url)} has no host")
    return url


MAX_METADATA_KEYS = 16
MAX_METADATA_VALUE_CHARS = 500
METADATA_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")


def metadata(field: str, value: object) -> dict[str, str]:
    """An application's labels: up to 16 plain keys with short string values."""
    if not isinstance(value, Mapping):
        raise InvalidInput(field, f"an object of strings, got {type(value).__name__}")
    if len(value) > MAX_METADATA_KEYS:
        raise InvalidInput(field, f"at most {MAX_METADATA_KEYS} keys, got {len(value)}")
    clean: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not METADATA_KEY.match(key):
            raise InvalidInput(field, f"key {describe(key)}: 1 to 40 of A-Z a-z 0-9 _ . -")
        clean[key] = text(f"{field}.{key}", item, max_chars=MAX_METADATA_VALUE_CHARS)
    return clean


def json_params(params: Mapping[str, Any]) -> None:
    """Params that can be stored as JSON on every backend; the error names the top-level key."""
    budget = [MAX_JSON_CHARS]
    for key, value in params.items():
        field = param_name(key)
        if field != key:
            raise InvalidInput(field, f"not a usable parameter name: {describe(key)}")
        _json_value(field, value, 0, budget)


def param_name(key: object) -> str:
    """The field an error about parameter ``key`` names: the key itself when it is
    clean text of at most 64 characters, else ``"params"``."""
    if isinstance(key, str) and 0 < len(key) <= 64 and bad_character(key) is None:
        return key
    return "params"


def _json_value(field: str, value: object, depth: int, budget: list[int]) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > MAX_JSON_INT:
            raise InvalidInput(field, "an integer outside the 64-bit range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput(field, f"{value} is not a finite number")
        return
    if isinstance(value, str):
        text(field, value, max_chars=MAX_JSON_CHARS)
        budget[0] -= len(value)
        if budget[0] < 0:
            raise InvalidInput(field, f"the parameters hold over {MAX_JSON_CHARS} characters")
        return
    if isinstance(value, list | dict):
        if depth >= MAX_JSON_DEPTH:
            raise InvalidInput(field, f"nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(value, list):
            for item in value:
                _json_value(field, item, depth + 1, budget)
            return
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInput(field, f"object keys are strings, got {describe(key)}")
            _json_value(field, key, depth + 1, budget)
            _json_value(field, item, depth + 1, budget)
        return
    raise InvalidInput(field, f"not a JSON value (a {type(value).__name__})")


# --- images ------------------------------------------------------------------------------


def sniff(data: bytes) -> str | None:
    """The image type the magic bytes announce (PNG, JPEG, WEBP), or None."""
    if data.startswith(PNG_MAGIC):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def image_header(data: bytes) -> tuple[str, int, int] | None:
    """(type, width, height) read from the file's header alone, or None when unreadable."""
    kind = sniff(data)
    if kind == "PNG":
        size = _png_size(data)
    elif kind == "JPEG":
        size = _jpeg_size(data)
    elif kind == "WEBP":
        size = _webp_size(data)
    else:
        return None
    return (kind, *size) if size else None


def _png_size(data: bytes) -> tuple[int, int] | None:
    # The first chunk is IHDR: length 13, type, width, height (big-endian).
    if len(data) < 24 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    # Walk the markers up to the first frame header (SOF0..SOF15 but DHT, JPG, DAC).
    i, n = 2, len(data)
    for _step in range(_JPEG_MAX_STEPS):
        if i + 2 > n or data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
            continue
        i += 2
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a segment
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return None
        if i + 2 > n:
            return None
        length = int.from_bytes(data[i : i + 2], "big")
        if length < 2:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 7 > n:
                return None
            height = int.from_bytes(data[i + 3 : i + 5], "big")
            width = int.from_bytes(data[i + 5 : i + 7], "big")
            return width, height
        i += length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None


def _check_pixels(field: str, width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise InvalidInput(field, f"an image of {width}x{height} pixels has no pixels")
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise InvalidInput(
            field,
            f"{width}x{height} pixels is over the limit "
            f"({MAX_IMAGE_SIDE} a side, {MAX_IMAGE_PIXELS} in all)",
        )


def read_image(
    field: str, data: object, formats: Collection[str] = ALL_IMAGE_FORMATS
) -> tuple[str, int, int]:
    """(type, width, height) of image bytes that decode as one of ``formats``.

    The size comes from the header and is capped before anything is decoded.
    """
    if not isinstance(data, bytes | bytearray):
        raise InvalidInput(field, f"image bytes are required, got {type(data).__name__}")
    data = bytes(data)
    names = [f for f in ALL_IMAGE_FORMATS if f in formats] or ["?"]
    accepted = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    header = image_header(data)
    if header is None:
        kind = sniff(data)
        if kind is not None and kind not in formats:
            raise InvalidInput(field, f"must be a {accepted} image, got {kind}")
        raise InvalidInput(field, f"not a readable image file (accepted: {accepted})")
    kind, width, height = header
    if kind not in formats:
        raise InvalidInput(field, f"must be a {accepted} image, got {kind}")
    _check_pixels(field, width, height)
    try:
        with Image.open(io.BytesIO(data), formats=[kind]) as opened:
            # Pillow's own reading of the header must be within the caps too.
            _check_pixels(field, *opened.size)
            opened.verify()
        with Image.open(io.BytesIO(data), formats=[kind]) as decoded:
            decoded.load()
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInput(field, "too many pixels to decode") from None
    except Exception as exc:  # Pillow's decoders raise many kinds (OSError, SyntaxError, ...)
        raise InvalidInput(field, f"not a readable {kind} image ({type(exc).__name__})") from None
    return kind, width, height


def safe_filename(name: str | None, default: str = "image.png") -> str:
    """A file name that can be stored and sent: ``name`` when it is clean text, else ``default``."""
    if not name or len(name) > MAX_NAME_CHARS or bad_character(name) or _CONTROL.search(name):
        return default
    return name
