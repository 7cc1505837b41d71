"""A faithful local emulator of the three provider APIs, with fault injection.

See docs/providers.md for the contract it follows; module docstrings of
piapi.py, piclaza.py and lemondata.py state the choices made where it is silent.
"""

from sandbox.app import create_sandbox_app
from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from sandbox.state import SandboxState

__all__ = ["SandboxConfig", "SandboxServer", "SandboxState", "create_sandbox_app"]
