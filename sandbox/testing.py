"""Helpers for tests that drive the sandbox: a webhook receiver and condition waits.

They live in the package (like ``flask.testing``) so unit, integration and
end-to-end tests can share them without a conftest.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from PIL import Image
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Request, Response


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 5.0,
    interval: float = 0.01,
    message: str = "condition",
) -> None:
    """Poll ``predicate`` until it is truthy; ``AssertionError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def png_bytes(width: int = 64, height: int = 64, image_format: str = "PNG") -> bytes:
    """A small image file, for upload tests."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 40)).save(buffer, format=image_format)
    return buffer.getvalue()


@dataclass(frozen=True)
class ReceivedWebhook:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    """A tiny HTTP server recording every POST it gets.

    ``statuses`` are answered to the first requests in order, then 200; this is
    how tests make the sandbox retry.
    """

    def __init__(self, statuses: Iterable[int] = (), host: str = "127.0.0.1") -> None:
        self._lock = threading.Lock()
        self._statuses: Iterator[int] = iter(list(statuses))
        self._received: list[ReceivedWebhook] = []
        self._host = host
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("WebhookReceiver is not started")
        return f"http://{self._host}:{self._server.server_port}"

    def received(self) -> list[ReceivedWebhook]:
        with self._lock:
            return list(self._received)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedWebhook]:
        wait_until(lambda: len(self.received()) >= count, timeout, message=f"{count} webhooks")
        return self.received()

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        body = request.get_data()
        with self._lock:
            status = next(self._statuses, 200)
            self._received.append(
                ReceivedWebhook(request.path, dict(request.headers), body, status)
            )
        return Response("ok", status=status)(environ, start_response)

    def start(self) -> WebhookReceiver:
        self._server = make_server(self._host, 0, self._app, threaded=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
