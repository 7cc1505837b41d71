"""The one guarded way out: HTTP to URLs that an application or a provider gave.

An input image to fetch, a result image to archive, an application's
``notify_url``: each names a host variflow does not control, so a request to
it could be turned against the worker's own network (SSRF). Every such request
goes through :class:`Outbound`, which

- **resolves the host once** (the resolver is a callable, :data:`Resolver`, so
  tests control it) and checks every address it got: private, loopback,
  link-local, multicast, unspecified, reserved and IPv4-embedded IPv6
  addresses are refused (:func:`refusal`), unless
  ``VARIFLOW_ALLOW_PRIVATE_URLS=true``;
- **connects to an address it checked, and no other**: the request targets the
  IP itself, with the original ``Host`` header and TLS server name (httpcore's
  ``sni_hostname`` request extension, so the certificate is still verified
  against the host name); nothing resolves the name a second time, so a DNS
  answer that changes between the check and the connection (DNS rebinding)
  cannot reach a private address;
- **follows no redirect** (a 3xx is an answer like any other) and keeps no
  connection open for another request (``Connection: close``);
- **caps the body** it reads and **the total time** of the exchange: every
  phase's timeout is what is left of the budget, the budget is checked between
  chunks, and a watchdog shuts the connection's socket when the budget runs
  out, so a server that trickles bytes cannot hold a worker.

A host that does not resolve is a permanent refusal naming the host
(:class:`UnresolvableHost`), except a resolver's "try again" (``EAI_AGAIN``),
which is a transient :class:`DNSUnavailable`. Application-given URLs are also
checked when they are given (:func:`check_url`).

Errors: :class:`OutboundRefused` (a ``ValueError``: not sent, retrying cannot
help), :class:`ResponseTooLarge` (a ``ValueError``), and ``httpx`` transport
errors (worth retrying), including :class:`TotalTimeout` and :class:`DNSUnavailable`.

Limits: the time the resolver takes counts against the budget but cannot be
cut short (getaddrinfo cannot be interrupted). The request goes through the
given client's transport: with an HTTP(S) proxy in its environment, the proxy
is asked for the checked IP (and an https URL then fails its certificate check,
since a CONNECT tunnel is opened without the server name) -- closed, not open.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import httpx

from worker.config import Settings
from worker.errors import VariflowError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# (host, port) -> the host's addresses, as strings; raises OSError (socket.gaierror)
# when the host does not resolve.
Resolver = Callable[[str, int], Sequence[str]]

USER_AGENT = "variflow"
_OWN_HEADERS = {"host", "connection"}  # set by Outbound only

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix (DNS64)
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215 local-use translation
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d (RFC 4291)
# Not globally reachable, and not (yet) known as such to every Python's ipaddress.
_NOT_GLOBAL = (ipaddress.IPv6Network("3fff::/20"),)  # documentation (RFC 9637)


class OutboundRefused(VariflowError, ValueError):
    """Not sent, and retrying cannot help: not an http(s) URL, a non-public address,
    a host that does not resolve. ``host`` names the host when there is one."""

    def __init__(self, message: str, host: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.host = host


class UnresolvableHost(OutboundRefused):
    """The URL's host has no address (a permanent refusal naming the host)."""

    def __init__(self, host: str, reason: str, *, temporary: bool = False) -> None:
        super().__init__(f"host {host!r} does not resolve ({reason})", host)
        self.temporary = temporary


class ResponseTooLarge(VariflowError, ValueError):
    """The answer's body is over the size cap; nothing of it is kept."""

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.message = message
        self.limit = limit


class DNSUnavailable(httpx.ConnectError):
    """The resolver said "try again" (EAI_AGAIN): worth retrying, like a refused connection."""


class TotalTimeout(httpx.TimeoutException):
    """The exchange outlasted its total time budget (whatever each phase took)."""


def refusal(address: Address) -> str | None:
    """Why variflow will not connect to ``address`` (e.g. "loopback"), or None when it is public.

    An IPv6 address that embeds an IPv4 one is judged by the embedded address
    where the embedding is a real route to it (NAT64's 64:ff9b::/96, which
    DNS64 networks answer for every IPv4-only host; 6to4's 2002::/16) and
    refused outright where no public host is ever reached that way
    (IPv4-mapped ::ffff:a.b.c.d, IPv4-compatible ::a.b.c.d, local-use NAT64).
    """
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"IPv4-mapped {address.ipv4_mapped}"
        if address in _IPV4_COMPATIBLE:
            return f"IPv4-compatible {ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)}"
        if address in _NAT64_LOCAL:
            return "local-use NAT64"
        if address in _NAT64:
            # 64:ff9b::/96 lies in the reserved ::/8 of older tables: judge the IPv4 only.
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
            why = refusal(inner)
            return None if why is None else f"NAT64 of {inner}, {why}"
        if address.sixtofour is not None:
            why = refusal(address.sixtofour)
            if why is not None:
                return f"6to4 of {address.sixtofour}, {why}"
    if address.is_multicast:
        return "multicast"
    if address.is_link_local:
        return "link-local"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local"
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    if not address.is_global or any(address in network for network in _NOT_GLOBAL):
        return "not globally reachable"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's answer (getaddrinfo), in its order of preference."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class Target:
    """A URL whose host was resolved once and checked: connect to ``addresses`` only."""

    url: httpx.URL
    host: str  # ASCII (IDNA) host: what the Host header and the TLS server name carry
    port: int
    addresses: tuple[str, ...]


def check_url(url: str, settings: Settings, resolver: Resolver | None = None) -> Target:
    """Parse ``url``, resolve its host once and check every address.

    Raises :class:`OutboundRefused` naming the host: not an http(s) URL, an
    address that is not public (unless VARIFLOW_ALLOW_PRIVATE_URLS=true), or
    (:class:`UnresolvableHost`) a host without an address.
    """
    return _check(url, settings.allow_private_urls, resolver or system_resolver)


def _check(url: str, allow_private: bool, resolver: Resolver) -> Target:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise OutboundRefused(f"not an http(s) URL ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise OutboundRefused(f"not an http(s) URL ({parsed.scheme or 'no'} scheme)")
    host = parsed.raw_host.decode("ascii")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        answers: Sequence[str] = [str(ipaddress.ip_address(host))]  # a literal: nothing to ask
        literal = True
    except ValueError:
        answers, literal = _resolve(host, port, resolver), False
    addresses: list[str] = []
    for answer in answers:
        try:
            address = ipaddress.ip_address(answer)
        except ValueError:
            raise OutboundRefused(f"host {host!r} resolved to {answer!r}", host) from None
        why = None if allow_private else refusal(address)
        if why is not None:
            verb = "is" if literal else "resolves to"
            raise OutboundRefused(
                f"host {host!r} {verb} a non-public address ({address}: {why}); "
                "set VARIFLOW_ALLOW_PRIVATE_URLS=true to allow it",
                host,
            )
        if str(address) not in addresses:
            addresses.append(str(address))
    return Target(parsed, host, port, tuple(addresses))


def _resolve(host: str, port: int, resolver: Resolver) -> Sequence[str]:
    try:
        answers = resolver(host, port)
    except socket.gaierror as exc:
        temporary = exc.errno == socket.EAI_AGAIN
        raise UnresolvableHost(host, exc.strerror or str(exc), temporary=temporary) from None
    except (OSError, UnicodeError) as exc:
        raise UnresolvableHost(host, str(exc) or type(exc).__name__) from None
    if not answers:
        raise UnresolvableHost(host, "no address")
    return answers


def describe(exc: httpx.HTTPError) -> str:
    """A transport error in a few words: its type, and what variflow's own ones say."""
    if isinstance(exc, TotalTimeout | DNSUnavailable):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


class _Budget:
    """The total time of one exchange; shuts the connection's socket when it runs out.

    httpx's timeouts bound each phase (connect, each read, ...), not their sum.
    Every phase gets what is left of the budget, and a timer shuts the socket
    down when nothing is left, which wakes a read that is blocked on it. The
    socket is a duplicate taken when the connection opens (httpcore's ``trace``
    extension), so it stays valid (and ours to close) whatever the transport
    does with its own.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._ends = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def left(self) -> float:
        return self._ends - time.monotonic()

    def exceeded(self) -> TotalTimeout:
        return TotalTimeout(f"no complete answer within the total time of {self.seconds:g}s")

    def check(self) -> None:
        if self._expired or self.left() <= 0:
            raise self.exceeded()

    def timeouts(self) -> dict[str, float]:
        left = self.left()
        return {"connect": left, "read": left, "write": left, "pool": left}

    def fail(self, exc: httpx.TransportError) -> NoReturn:
        """Raise a transport error, as TotalTimeout once the budget ran out (the watchdog's
        shutdown surfaces as a read error or a closed connection)."""
        if self._expired or self.left() <= 0:
            raise self.exceeded() from exc
        raise exc

    def trace(self, event: str, info: Mapping[str, Any]) -> None:
        if event != "connection.connect_tcp.complete":
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if not isinstance(sock, socket.socket):
            return
        duplicate = sock.dup()
        with self._lock:
            self._sockets.append(duplicate)
            if self._expired:
                _shut(duplicate)

    def __enter__(self) -> _Budget:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()

    def _expire(self) -> None:
        with self._lock:
            self._expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # the peer closed it already
        sock.shutdown(socket.SHUT_RDWR)


class Reply:
    """An answer's status and headers; :meth:`read` takes the body within the caps."""

    def __init__(self, response: httpx.Response, max_bytes: int, budget: _Budget) -> None:
        self._response = response
        self._max_bytes = max_bytes
        self._budget = budget
        self.status_code = response.status_code
        self.headers = response.headers

    @property
    def is_redirect(self) -> bool:
        """A 3xx with a Location: never followed, and usually a refusal for the caller."""
        return self._response.is_redirect

    def read(self) -> bytes:
        """The body, or ResponseTooLarge past the cap, or TotalTimeout past the budget."""
        limit = self._max_bytes
        declared = self.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ResponseTooLarge(f"over the limit of {limit} bytes ({declared} declared)", limit)
        chunks, size = [], 0
        try:
            for chunk in self._response.iter_bytes():
                size += len(chunk)
                if size > limit:
                    raise ResponseTooLarge(f"over the limit of {limit} bytes", limit)
                self._budget.check()
                chunks.append(chunk)
        except TotalTimeout:
            raise
        except httpx.TransportError as exc:
            self._budget.fail(exc)
        self._budget.check()  # a body read until the connection closes ends early when shut
        return b"".join(chunks)


class Outbound:
    """The guarded client: sends through ``client`` (its transport and connection pool)
    a request built here, never with the client's own headers, cookies or auth."""

    def __init__(
        self, client: httpx.Client, settings: Settings, resolver: Resolver | None = None
    ) -> None:
        self._client = client
        self._allow_private = settings.allow_private_urls
        self._resolver = resolver or system_resolver

    @contextlib.contextmanager
    def open(
        self,
        method: str,
        url: str,
        *,
        timeout: float,
        max_bytes: int,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
    ) -> Iterator[Reply]:
        """Send one request to ``url`` and yield its answer; ``timeout`` is the total time.

        Raises OutboundRefused before anything is sent, or an httpx.TransportError
        (TotalTimeout once ``timeout`` seconds have passed since the call).
        """
        with _Budget(timeout) as budget:
            try:
                target = _check(url, self._allow_private, self._resolver)
            except UnresolvableHost as exc:
                if exc.temporary:
                    raise DNSUnavailable(exc.message) from exc
                raise
            response = self._send(target, method, headers or {}, content, budget)
            try:
                yield Reply(response, max_bytes, budget)
            finally:
                response.close()

    def _send(
        self,
        target: Target,
        method: str,
        headers: Mapping[str, str],
        content: bytes | None,
        budget: _Budget,
    ) -> httpx.Response:
        failure: httpx.TransportError | None = None
        for address in target.addresses:
            budget.check()
            request = httpx.Request(
                method,
                target.url.copy_with(host=address),  # the checked address, not the name
                headers={
                    "User-Agent": USER_AGENT,
                    "Accept-Encoding": "identity",
                    **{k: v for k, v in headers.items() if k.lower() not in _OWN_HEADERS},
                    "Host": target.url.netloc.decode("ascii"),
                    "Connection": "close",
                },
                content=content,
                extensions={
                    "timeout": budget.timeouts(),
                    "sni_hostname": target.host,
                    "trace": budget.trace,
                },
            )
            try:
                return self._client.send(request, stream=True, follow_redirects=False, auth=None)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failure = exc  # nothing was sent: another checked address may answer
            except httpx.TransportError as exc:
                budget.fail(exc)
        assert failure is not None  # a Target has at least one address
        budget.fail(failure)
