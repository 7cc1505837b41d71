"""Where a request finds the sandbox state: ``app.extensions["sandbox"]``."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from flask import current_app

if TYPE_CHECKING:
    from sandbox.state import SandboxState

EXTENSION_KEY = "sandbox"


def current_state() -> SandboxState:
    return cast("SandboxState", current_app.extensions[EXTENSION_KEY])
