"""Input images (URL, local path or bytes) and the worker's guarded fetch of a URL."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from worker.config import Settings
from worker.errors import InputImageError, InvalidInput, TransientUpstreamError
from worker.providers.base import InputImage

ImageInput = str | bytes | os.PathLike[str]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def content_type(content: bytes) -> str:
    if content.startswith(PNG_MAGIC):
        return "image/png"
    if content.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def resolve_image(image: ImageInput, max_bytes: int) -> tuple[str | None, InputImage | None]:
    """An image argument as (URL, None) or (None, bytes read now). InvalidInput names it."""
    if isinstance(image, bytes | bytearray):
        data = bytes(image)
        name = "image.png"
    elif isinstance(image, str) and urlsplit(image).scheme in ("http", "https"):
        if not urlsplit(image).hostname:
            raise InvalidInput("image", f"{image!r} has no host")
        return image, None
    elif isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise InvalidInput("image", f"{str(image)!r} is neither an http(s) URL nor a file")
        if path.stat().st_size > max_bytes:
            raise InvalidInput("image", f"{path.name} is over the limit of {max_bytes} bytes")
        data, name = path.read_bytes(), path.name
    else:
        raise InvalidInput("image", "a URL, a file path or bytes")
    if not data:
        raise InvalidInput("image", "empty")
    if len(data) > max_bytes:
        raise InvalidInput("image", f"{len(data)} bytes is over the limit of {max_bytes}")
    return None, InputImage(data, name, content_type(data))


def check_public_host(host: str, port: int) -> None:
    """Refuse hosts that resolve to private, loopback, link-local or reserved addresses."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TransientUpstreamError(f"image URL host {host!r} does not resolve") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global or address.is_multicast:
            raise InputImageError(
                f"image URL host {host!r} is a non-public address ({address}); "
                "set VARIFLOW_ALLOW_PRIVATE_URLS=true to allow it"
            )


def fetch_image(url: str, settings: Settings, client: httpx.Client) -> InputImage:
    """Download an input image for a provider that needs the file itself."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputImageError(f"image URL must be http(s), got {parts.scheme or 'no'} scheme")
    if not settings.allow_private_urls:
        check_public_host(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    limit = settings.max_image_bytes
    try:
        with client.stream("GET", url, follow_redirects=False, timeout=30.0) as response:
            if response.is_redirect:
                raise InputImageError("image URL answered with a redirect; give the final URL")
            if response.status_code >= 500:
                raise TransientUpstreamError(f"image URL answered HTTP {response.status_code}")
            if response.status_code != 200:
                raise InputImageError(f"image URL answered HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise InputImageError(f"image is {declared} bytes, over the limit of {limit}")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limit:
                    raise InputImageError(f"image is over the limit of {limit} bytes")
                chunks.append(chunk)
    except httpx.TransportError as exc:
        raise TransientUpstreamError(f"image URL: {type(exc).__name__}") from exc
    data = b"".join(chunks)
    name = Path(parts.path).name or "image.png"
    return InputImage(data, name, content_type(data))
