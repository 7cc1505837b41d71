"""``python -m sandbox [--host H] [--port P]``: serve the sandbox until interrupted."""

from __future__ import annotations

import argparse

from sandbox.server import DEFAULT_PORT, main

parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=DEFAULT_PORT)
arguments = parser.parse_args()
main(arguments.host, arguments.port)
