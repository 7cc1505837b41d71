"""Input images (URL, local path or bytes) and the worker's guarded fetch of a URL."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from worker import validation
from worker.config import Settings
from worker.errors import InputImageError, InvalidInput, TransientUpstreamError
from worker.outbound import Outbound, OutboundRefused, Resolver, ResponseTooLarge, describe
from worker.providers.base import InputImage
from worker.validation import IMAGE_TYPES, http_url, safe_filename, sniff

ImageInput = str | bytes | os.PathLike[str]


def content_type(content: bytes) -> str:
    """The media type the magic bytes announce (PNG, JPEG, WEBP), else application/octet-stream.

    Only a guess from the first bytes: whether the file decodes is the adapter's
    ``validate()`` (worker.validation.read_image)."""
    kind = sniff(content)
    return IMAGE_TYPES[kind] if kind else "application/octet-stream"


def resolve_image(image: ImageInput, max_bytes: int) -> tuple[str | None, InputImage | None]:
    """An image argument as (URL, None) or (None, bytes read now). InvalidInput names it.

    A string starting with ``http:`` or ``https:`` is a URL and must be a valid
    http(s) URL with a host (worker.validation.http_url); any other string or
    path is a local file. Whether the bytes are an acceptable image is decided
    by the provider's ``validate()``.
    """
    if isinstance(image, bytes | bytearray):
        data, name = bytes(image), "image.png"
    elif isinstance(image, str) and image[:6].lower().startswith(("http:", "https:")):
        return http_url("image", image), None
    elif isinstance(image, str | os.PathLike):
        data, name = _read_file(image, max_bytes)
    else:
        raise InvalidInput("image", f"a URL, a file path or bytes, got {type(image).__name__}")
    if not data:
        raise InvalidInput("image", "empty")
    if len(data) > max_bytes:
        raise InvalidInput("image", f"{len(data)} bytes is over the limit of {max_bytes}")
    return None, InputImage(data, name, content_type(data))


def _read_file(image: str | os.PathLike[str], max_bytes: int) -> tuple[bytes, str]:
    """The bytes (at most ``max_bytes`` + 1 of them) and a storable name of a local file."""
    try:
        path = Path(image)
        is_file = path.is_file()
    except (OSError, TypeError, ValueError):  # too long, not text, NUL, ...
        is_file = False
    if not is_file:
        raise InvalidInput(
            "image", f"{validation.describe(image)} is neither an http(s) URL nor a file"
        )
    try:
        if path.stat().st_size > max_bytes:
            raise InvalidInput("image", f"the file is over the limit of {max_bytes} bytes")
        with path.open("rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise InvalidInput("image", f"the file cannot be read ({type(exc).__name__})") from None
    # A name that cannot be stored (undecodable bytes, control characters) is replaced.
    default = {"PNG": "image.png", "JPEG": "image.jpg", "WEBP": "image.webp"}.get(
        sniff(data) or "", "image"
    )
    return data, safe_filename(path.name, default)


# The whole download, connection included: a slow or trickling server cannot hold a submit.
FETCH_TIMEOUT = 30.0


def fetch_image(
    url: str, settings: Settings, client: httpx.Client, *, resolver: Resolver | None = None
) -> InputImage:
    """Download an input image for a provider that needs the file itself.

    Through the guarded client (worker/outbound.py): a refused or unresolvable
    host, a redirect, an error answer or an image over the limit fails the job
    (InputImageError); transport trouble and 5xx are worth retrying.
    """
    limit = settings.max_image_bytes
    try:
        with Outbound(client, settings, resolver).open(
            "GET", url, timeout=FETCH_TIMEOUT, max_bytes=limit
        ) as reply:
            if reply.is_redirect:
                raise InputImageError("image URL answered with a redirect; give the final URL")
            if reply.status_code >= 500:
                raise TransientUpstreamError(f"image URL answered HTTP {reply.status_code}")
            if reply.status_code != 200:
                raise InputImageError(f"image URL answered HTTP {reply.status_code}")
            data = reply.read()
    except OutboundRefused as exc:
        raise InputImageError(f"image URL: {exc.message}") from None
    except ResponseTooLarge as exc:
        raise InputImageError(f"image is {exc.message}") from None
    except httpx.TransportError as exc:
        raise TransientUpstreamError(f"image URL: {describe(exc)}") from exc
    name = Path(urlsplit(url).path).name or "image.png"
    return InputImage(data, name, content_type(data))
