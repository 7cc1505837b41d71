"""The sandbox app under the Flask test client; each module picks its ``sandbox_config``
and, if it moves time by hand, its ``sandbox_clock``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from sandbox.app import create_sandbox_app
from sandbox.clock import Clock
from sandbox.config import SandboxConfig
from sandbox.context import EXTENSION_KEY
from sandbox.state import SandboxState


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    return SandboxConfig(pending_seconds=0.05, processing_seconds=0.1, seed=1)


@pytest.fixture
def sandbox_clock() -> Clock | None:
    """None: the real clocks."""
    return None


@pytest.fixture
def app(sandbox_config: SandboxConfig, sandbox_clock: Clock | None) -> Iterator[Flask]:
    app = create_sandbox_app(sandbox_config, clock=sandbox_clock)
    yield app
    app.extensions[EXTENSION_KEY].close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def state(app: Flask) -> SandboxState:
    state: SandboxState = app.extensions[EXTENSION_KEY]
    return state
