"""Hosts on one machine: Linux network namespaces joined by veth pairs to a bridge.

Each :class:`Host` is a network namespace with one interface (``eth0``) on a
private LAN; the LAN's bridge lives in a namespace of its own, so the root
namespace's interfaces, addresses and routes are never touched. Processes run
on a host with ``ip netns exec``; this process reaches a host's network from a
thread that has entered its namespace (:meth:`Host.call`), so a test can be a
client on the LAN without a subprocess per request.

Names carry the owner's pid and a random tag: two runs never collide, and a
run that died without cleaning up (SIGKILL) is cleaned by the next one
(:func:`remove_stale`), which only touches namespaces of dead owners.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import http.server
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")

PREFIX = "variflow-"  # every namespace this module makes starts with it
NETNS_DIR = Path("/run/netns")
SUBNET = "10.77.0"  # private to the LAN's namespaces: the root namespace never sees it
CLONE_NEWNET = 0x40000000  # <sched.h>: setns() into a network namespace
# libc's setns(2) through ctypes: os.setns is Python 3.12+, and this project runs on 3.11.
_libc = ctypes.CDLL(None, use_errno=True)


class NamespacesUnavailable(RuntimeError):
    """This machine cannot make network namespaces here (not root, no ``ip``, ...)."""


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def check_available() -> None:
    """Raise :class:`NamespacesUnavailable` saying why namespaces cannot be made."""
    if os.geteuid() != 0:
        raise NamespacesUnavailable(f"network namespaces need root (running as uid {os.getuid()})")
    if shutil.which("ip") is None:
        raise NamespacesUnavailable("the `ip` command (iproute2) is not installed")
    probe = f"{PREFIX}{os.getpid()}-probe-{uuid.uuid4().hex[:6]}"
    try:
        ip("netns", "add", probe)
    except RuntimeError as exc:
        raise NamespacesUnavailable(str(exc)) from exc
    ip("netns", "del", probe)


def _owner_alive(name: str) -> bool:
    pid = name.removeprefix(PREFIX).split("-", 1)[0]
    if not pid.isdigit():
        return True  # not one of ours after all: leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespace_pids(netns: str) -> list[int]:
    done = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
    )
    return [int(pid) for pid in done.stdout.split()]


def kill_namespace(netns: str) -> None:
    """SIGKILL every process in ``netns`` (a host losing power), and wait until none is left."""
    deadline = time.monotonic() + 30
    while pids := namespace_pids(netns):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in {netns} survived SIGKILL")
        time.sleep(0.02)


def remove_stale() -> None:
    """Remove the namespaces (and their processes) of earlier runs whose process is gone."""
    if not NETNS_DIR.is_dir():
        return
    for path in NETNS_DIR.iterdir():
        if path.name.startswith(PREFIX) and not _owner_alive(path.name):
            kill_namespace(path.name)
            with contextlib.suppress(RuntimeError):
                ip("netns", "del", path.name)


def _enter(netns: str) -> None:
    """Move the calling thread (only it) into ``netns``."""
    fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns({netns}): {os.strerror(error)}")
    finally:
        os.close(fd)


@dataclass
class Host:
    """A machine on the LAN: a network namespace with one address."""

    name: str
    netns: str
    address: str
    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _thread: concurrent.futures.ThreadPoolExecutor | None = None
    _logs: list[IO[bytes]] = field(default_factory=list)

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run ``fn`` in a thread inside this host's network: every socket it opens
        (connecting or listening) belongs to the host, and stays there."""
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(
                1,
                thread_name_prefix=f"netns-{self.name}",
                initializer=_enter,
                initargs=(self.netns,),
            )
        return self._thread.submit(fn).result(timeout)

    def run(self, argv: Sequence[str], env: Mapping[str, str], timeout: float = 120) -> str:
        """Run a command on this host to its end; its standard output (fails on non-zero)."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{self.name}: {' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}"
            )
        return done.stdout

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        """Start a long-running process on this host (output: ``<log_dir>/<host>-<name>.log``)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{self.name}-{name}.log").open("ab")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *argv],
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = self.log_dir / f"{self.name}-{name}.log"
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise RuntimeError(f"{self.name}/{name} exited {proc.returncode}; {log}:\n{tail}")

    def power_off(self) -> None:
        """Every process of this host dies at once (SIGKILL), as when a machine is lost."""
        kill_namespace(self.netns)
        for proc in self.procs.values():
            proc.wait(30)
        self.procs.clear()

    def close(self) -> None:
        # Nothing of a test's host is worth a graceful stop: its folders are thrown away.
        self.power_off()
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        for log in self._logs:
            log.close()
        self._logs.clear()


class Lan:
    """A bridge in a namespace of its own, and hosts plugged into it."""

    def __init__(self, log_dir: Path) -> None:
        self.tag = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.log_dir = log_dir
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        try:
            self._add_namespace(f"{self.tag}-lan")
            ip("-n", self.lan, "link", "add", "br0", "type", "bridge")
            ip("-n", self.lan, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    @property
    def lan(self) -> str:
        return f"{self.tag}-lan"

    def _add_namespace(self, netns: str) -> None:
        ip("netns", "add", netns)
        self._namespaces.append(netns)
        ip("-n", netns, "link", "set", "lo", "up")

    def add_host(self, name: str) -> Host:
        number = len(self.hosts) + 2  # .1 is left for a gateway nobody needs
        netns = f"{self.tag}-{name}"
        self._add_namespace(netns)
        port = f"p{number}"  # the bridge's end, inside the LAN namespace only
        veth = ("type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("-n", self.lan, "link", "add", port, *veth)
        ip("-n", self.lan, "link", "set", port, "master", "br0", "up")
        address = f"{SUBNET}.{number}"
        ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0", "nodad")
        ip("-n", netns, "link", "set", "eth0", "up")
        host = Host(name, netns, address, self.log_dir)
        self.hosts[name] = host
        return host

    def close(self) -> None:
        """Stop every host's processes and remove every namespace, whatever failed before."""
        errors: list[BaseException] = []
        for host in reversed(self.hosts.values()):  # clients first, the servers they use last
            try:
                host.close()
            except BaseException as exc:  # keep removing the rest
                errors.append(exc)
        for netns in reversed(self._namespaces):
            try:
                kill_namespace(netns)
                ip("netns", "del", netns)
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Lan:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def wait_until(
    predicate: Callable[[], T | None],
    what: str,
    timeout: float = 30.0,
    alive: Callable[[], None] = lambda: None,
) -> T:
    """Wait for ``predicate`` to return a truthy value; ``alive`` raises if a process died."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def can_connect(address: str, port: int) -> bool:
    """Whether a TCP connection to ``address:port`` opens (run it through :meth:`Host.call`)."""
    try:
        with socket.create_connection((address, port), timeout=1):
            return True
    except OSError:
        return False


# --- servers of a test's own, bound to a host's address ----------------------------------

PG_PORT = 5432
REDIS_PORT = 6379
S3_PORT = 9000
SANDBOX_PORT = 8765


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise FileNotFoundError(f"{name} not found (install PostgreSQL's server package)")
    return str(found)


def _as_postgres(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def postgres_url(host: Host) -> str:
    """The URL of database ``variflow`` of :func:`start_postgres`'s server on ``host``."""
    return f"postgresql+psycopg://postgres@{host.address}:{PG_PORT}/variflow"


def start_postgres(host: Host, folder: Path) -> str:
    """A PostgreSQL of its own on ``host`` (initdb into ``folder``): the URL of its
    database ``variflow``. ``folder`` must be reachable by the ``postgres`` user."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data = folder / "data"
    initdb = [_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
    subprocess.run(_as_postgres(initdb), capture_output=True, check=True, timeout=120, cwd="/")
    # Trust the LAN, as initdb's --auth=trust trusts loopback (a throwaway server).
    with (data / "pg_hba.conf").open("a") as hba:
        hba.write(f"host all all {SUBNET}.0/24 trust\n")
    # The unix socket in `folder` lets this process ask "ready?" without the LAN.
    server = [
        _pg_bin("postgres"), "-D", str(data), "-k", str(folder), "-h", host.address,
        "-p", str(PG_PORT), "-c", "fsync=off", "-c", "synchronous_commit=off",
    ]  # fmt: skip
    host.start("postgres", _as_postgres(server), os.environ)
    ready = [_pg_bin("pg_isready"), "-h", str(folder), "-p", str(PG_PORT), "-q"]
    wait_until(
        lambda: subprocess.run(ready, check=False).returncode == 0,
        "PostgreSQL to accept connections",
        alive=host.check_alive,
    )
    createdb = [_pg_bin("createdb"), "-h", str(folder), "-p", str(PG_PORT), "-U", "postgres"]
    subprocess.run([*createdb, "variflow"], capture_output=True, check=True, timeout=60)
    return postgres_url(host)


def start_redis(host: Host) -> str:
    """Start a Redis of its own on ``host`` (wait with :func:`wait_listening`): its URL."""
    argv = [
        "redis-server", "--bind", host.address, "--port", str(REDIS_PORT),
        "--protected-mode", "no", "--save", "", "--appendonly", "no",
    ]  # fmt: skip
    host.start("redis", argv, os.environ)
    return f"redis://{host.address}:{REDIS_PORT}/0"


def start_s3(host: Host, python: str) -> str:
    """Start moto's S3-compatible server (package ``moto[server]``) on ``host``: its endpoint."""
    argv = [python, "-m", "moto.server", "-H", host.address, "-p", str(S3_PORT)]
    host.start("s3", argv, os.environ)
    return f"http://{host.address}:{S3_PORT}"


def start_sandbox(host: Host, python: str, knobs: Mapping[str, str]) -> str:
    """Start the provider sandbox on ``host`` with ``VARIFLOW_SANDBOX_*`` ``knobs``: its URL."""
    argv = [python, "-m", "sandbox", "--host", host.address, "--port", str(SANDBOX_PORT)]
    host.start("sandbox", argv, {**os.environ, **knobs})
    return f"http://{host.address}:{SANDBOX_PORT}"


def wait_listening(host: Host, ports: Sequence[int], timeout: float = 60.0) -> None:
    """Wait until every port of ``host`` accepts TCP connections (from the host itself)."""
    for port in ports:
        wait_until(
            lambda: host.call(lambda: can_connect(host.address, port)),  # noqa: B023
            f"{host.name}:{port} to listen",
            timeout,
            alive=host.check_alive,
        )


class ImageServer:
    """A PNG served over HTTP on a host. ``/open/<name>`` answers at once; ``/held/<name>``
    answers only after :meth:`release`, so whoever fetches it is caught mid-task. Each
    request is recorded as (path, address of the host that asked)."""

    def __init__(self, host: Host, png: bytes, port: int = 8080) -> None:
        self.base_url = f"http://{host.address}:{port}"
        self.requests: list[tuple[str, str]] = []
        self._released = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, self.client_address[0]))
                if self.path.startswith("/held/"):
                    server._released.wait(60)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(png)))
                    self.end_headers()
                    self.wfile.write(png)
                except OSError:
                    pass  # the host that asked is gone (powered off): nobody to answer

            def log_message(self, *args: object) -> None:
                pass

        # Made in the host's network: the listening socket is the host's.
        self._server = host.call(
            lambda: http.server.ThreadingHTTPServer((host.address, port), Handler)
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def held_by(self, address: str) -> list[str]:
        """The held paths that the host at ``address`` asked for."""
        seen = list(self.requests)
        return [path for path, asker in seen if asker == address and path.startswith("/held/")]

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
