"""Result images: real PNG files whose colours are derived from a key.

Clients download and check result files, so they must be genuine PNGs. A file
is registered when a task completes and rendered on first download; the bytes
are cached so repeated downloads are cheap and identical.
"""

from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import dataclass

from PIL import Image, ImageOps


def render_png(key: str, size: int) -> bytes:
    """A ``size`` x ``size`` vertical gradient between two colours taken from ``key``."""
    digest = hashlib.sha256(key.encode()).digest()
    top = (digest[0], digest[1], digest[2])
    bottom = (digest[3], digest[4], digest[5])
    gradient = Image.linear_gradient("L")
    if size != gradient.width:
        gradient = gradient.resize((size, size))
    image = ImageOps.colorize(gradient, black=top, white=bottom)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class _FileSpec:
    key: str
    size: int


class ImageStore:
    """Known result files by name, rendered lazily and cached in memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._specs: dict[str, _FileSpec] = {}
        self._cache: dict[str, bytes] = {}

    def register(self, name: str, size: int) -> None:
        with self._lock:
            self._specs[name] = _FileSpec(key=name, size=size)

    def get(self, name: str) -> bytes | None:
        """The PNG bytes of ``name``, or None when no task produced it (or after a reset)."""
        with self._lock:
            cached = self._cache.get(name)
            spec = self._specs.get(name)
        if cached is not None:
            return cached
        if spec is None:
            return None
        # Rendered outside the lock: two racing first downloads just render twice.
        data = render_png(spec.key, spec.size)
        with self._lock:
            if name in self._specs:
                self._cache.setdefault(name, data)
        return data

    def clear(self) -> None:
        with self._lock:
            self._specs.clear()
            self._cache.clear()
