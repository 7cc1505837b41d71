"""An S3-compatible HTTP server for tests: moto's server (``python -m moto.server``) in a
subprocess, on a host and port of the caller's choosing.

:func:`start_moto_server` returns a running :class:`MotoServer` once it answers
HTTP (polled, never slept for); ``command_prefix`` runs it elsewhere, e.g.
``("ip", "netns", "exec", "host-b")`` in a network namespace. tests/conftest.py
has a session fixture, ``s3_server``, on loopback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pytest

from worker.devstack import free_port, wait_until_http_ok

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# moto accepts any credentials; these only need to be the same on every side.
ACCESS_KEY = "variflow-test"
SECRET_KEY = "variflow-test-secret"
REGION = "us-east-1"
# AWS variables a developer's shell may carry that would point the tests elsewhere.
AWS_VARIABLES = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


@dataclass
class MotoServer:
    """A running moto server; ``stop()`` (or leaving its ``with`` block) ends it."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The AWS variables that point a process (boto3's defaults) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
        }

    def client(self) -> S3Client:
        """A boto3 client of this server, for a test to look into its buckets."""
        import boto3  # slow to import: only the tests that use S3 pay for it

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def create_bucket(self, name: str | None = None) -> str:
        """A new, empty bucket (a name of its own unless told): a test's own."""
        bucket = name or f"variflow-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_moto_server(
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    command_prefix: Sequence[str] = (),
    log: Path | None = None,
    timeout: float = 60.0,
) -> MotoServer:
    """Start moto's S3-compatible server on ``host:port`` (a free loopback port unless
    told) and return it once it answers HTTP at that address."""
    port = port or free_port()
    argv = [*command_prefix, sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]
    out: Any = log.open("ab") if log is not None else subprocess.DEVNULL
    try:
        # A session of its own, so that stop() ends it and anything it forked.
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log is not None:
            out.close()
    server = MotoServer(proc, host, port)
    try:
        wait_until_http_ok(f"{server.url}/moto-api/", timeout=timeout, proc=proc)
    except BaseException:
        server.stop()
        raise
    return server


def use_s3_env(monkeypatch: pytest.MonkeyPatch, server: MotoServer) -> None:
    """Point this process (and the processes it starts) at ``server`` through the usual
    AWS variables, and at nothing else."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
