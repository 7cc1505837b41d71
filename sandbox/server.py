"""Serving the sandbox over real HTTP: in a background thread (tests) or forever (CLI)."""

from __future__ import annotations

import threading
from types import TracebackType

from werkzeug.serving import BaseWSGIServer, make_server

from sandbox.app import create_sandbox_app
from sandbox.clock import Clock
from sandbox.config import SandboxConfig
from sandbox.context import EXTENSION_KEY
from sandbox.state import SandboxState

DEFAULT_PORT = 8765
# How often serve_forever checks for shutdown; the default 0.5 s slows test teardown.
SHUTDOWN_POLL_SECONDS = 0.05


class SandboxServer:
    """The sandbox app on ``host:port`` (port 0 = any free port) in a daemon thread.

    Use as a context manager; ``url`` is known once started.
    """

    def __init__(
        self,
        config: SandboxConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.app = create_sandbox_app(config, clock=clock)
        self.state: SandboxState = self.app.extensions[EXTENSION_KEY]
        self.host = host
        self.port = port
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def config(self) -> SandboxConfig:
        return self.state.config

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("SandboxServer is not started")
        return f"http://{self.host}:{self._server.server_port}"

    def start(self) -> SandboxServer:
        if self._server is not None:
            return self
        self._server = make_server(self.host, self.port, self.app, threaded=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS},
            name="sandbox-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self.state.close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def main(host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Serve the sandbox until interrupted, with knobs from ``VARIFLOW_SANDBOX_*``."""
    config = SandboxConfig.from_env()
    app = create_sandbox_app(config)
    server = make_server(host, port, app, threaded=True)
    print(f"variflow sandbox on http://{host}:{server.server_port}", flush=True)
    print(
        f"  base URLs: /piapi /piclaza /lemondata; {len(config.api_keys)} API key(s) accepted",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.extensions[EXTENSION_KEY].close()
