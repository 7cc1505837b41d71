"""The one guarded way out (worker/outbound.py): which addresses are refused, that the
connection goes to the address that was checked, no redirects, the size and total-time
caps, unresolvable hosts, and the notify_url check at submit and at send time.

Real HTTP against small local servers on loopback (allowed by
VARIFLOW_ALLOW_PRIVATE_URLS where a test needs to reach them), with a resolver the
test controls, and httpx.MockTransport where the address must be a public one."""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import ipaddress
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select

from worker import outbound
from worker.api import get_job, submit_variation
from worker.config import Settings
from worker.errors import (
    ErrorCode,
    InputImageError,
    InvalidInput,
    PermanentUpstreamError,
    TransientUpstreamError,
)
from worker.finalize import (
    NotifyFailed,
    NotifyRefused,
    archive_results,
    notify,
    post_notification,
)
from worker.images import fetch_image
from worker.models import Job, utcnow
from worker.outbound import (
    DNSUnavailable,
    Outbound,
    OutboundRefused,
    ResponseTooLarge,
    TotalTimeout,
    UnresolvableHost,
    check_url,
    refusal,
)
from worker.runtime import current, session_scope

Configure = Callable[..., Settings]

SECRET = "whsec_" + base64.b64encode(b"variflow-test-notify-secret-32by").decode()
PIAPI: dict[str, Any] = {"origin_task_id": "o-1", "index": "1", "prompt": "a red fox"}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


# --- a resolver the test controls -------------------------------------------------------


class Resolver:
    """Answers each call with the next answer (the last one repeats); an exception is raised."""

    def __init__(self, *answers: Sequence[str] | BaseException) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append((host, port))
        answer = self.answers[min(len(self.calls), len(self.answers)) - 1]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def nxdomain() -> socket.gaierror:
    return socket.gaierror(socket.EAI_NONAME, "Name or service not known")


# --- a tiny HTTP server -----------------------------------------------------------------

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


class Server:
    """Serves each path with a handler; records (path, Host header) of every request."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[tuple[str, str]] = []
        owner = self

        class RequestHandler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                owner.requests.append((self.path, self.headers.get("Host", "")))
                route = owner.routes.get(self.path)
                try:
                    if route is None:
                        reply(self, 404, b"not found")
                    else:
                        route(self)
                except OSError:
                    pass  # the client hung up: that is what some tests want

            do_GET = do_POST = _serve

            def log_message(self, *args: object) -> None:
                pass

        class Threads(http.server.ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

        self.httpd = Threads(("127.0.0.1", 0), RequestHandler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    def route(self, path: str, handler: Handler) -> str:
        self.routes[path] = handler
        return self.url + path

    def hits(self, path: str) -> list[str]:
        return [host for p, host in self.requests if p == path]


def reply(
    handler: http.server.BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def answer(status: int, body: bytes = b"", **headers: str) -> Handler:
    return lambda handler: reply(
        handler, status, body, {k.replace("_", "-"): v for k, v in headers.items()}
    )


def running(server: Server) -> Iterator[Server]:
    thread = threading.Thread(target=server.httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    yield from running(Server())


@pytest.fixture
def private_ok(configure: Configure, tmp_path: Path, sqlite_url: str) -> Settings:
    """Loopback allowed: the settings the sandbox and the local test servers need."""
    return configure(
        allow_private_urls=True,
        notify_secret=SECRET,
        result_store=str(tmp_path / "store"),
        public_url="https://variflow.example.test",
    )


@pytest.fixture
def public_only(configure: Configure, tmp_path: Path, sqlite_url: str) -> Settings:
    """The default: only public addresses."""
    return configure(
        allow_private_urls=False,
        notify_secret=SECRET,
        result_store=str(tmp_path / "store"),
        public_url="https://variflow.example.test",
    )


def get(
    settings: Settings,
    url: str,
    resolver: Resolver | None = None,
    *,
    client: httpx.Client | None = None,
    timeout: float = 5.0,
    max_bytes: int = 1 << 20,
) -> tuple[int, bytes]:
    guarded = Outbound(client or current().http, settings, resolver)
    with guarded.open("GET", url, timeout=timeout, max_bytes=max_bytes) as answer:
        return answer.status_code, answer.read()


# --- which addresses are refused --------------------------------------------------------

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.10.20.30", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("192.0.2.7", "private"),  # documentation
    ("2001:db8::1", "private"),  # documentation
    ("2001::1", "private"),  # Teredo
    ("100.64.0.1", "not globally reachable"),  # shared address space (carrier NAT)
    ("3fff::1", "not globally reachable"),  # documentation (RFC 9637)
    ("169.254.169.254", "link-local"),  # cloud metadata
    ("fe80::1", "link-local"),
    ("fec0::1", "site-local"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("5f00::1", "reserved"),
    ("::ffff:127.0.0.1", "IPv4-mapped 127.0.0.1"),
    ("::ffff:169.254.169.254", "IPv4-mapped 169.254.169.254"),
    ("::ffff:8.8.8.8", "IPv4-mapped 8.8.8.8"),  # never a real IPv6 destination
    ("::127.0.0.1", "IPv4-compatible 127.0.0.1"),
    ("::8.8.8.8", "IPv4-compatible 8.8.8.8"),  # deprecated form
    ("64:ff9b::127.0.0.1", "NAT64 of 127.0.0.1, loopback"),
    ("64:ff9b::10.0.0.1", "NAT64 of 10.0.0.1, private"),
    ("64:ff9b::169.254.169.254", "NAT64 of 169.254.169.254, link-local"),
    ("64:ff9b:1::8.8.8.8", "local-use NAT64"),
    ("64:ff9b:1::a00:1", "local-use NAT64"),
    ("2002:7f00:1::1", "6to4 of 127.0.0.1, loopback"),
    ("2002:a9fe:a9fe::", "6to4 of 169.254.169.254, link-local"),
    ("2002:c0a8:101::1", "6to4 of 192.168.1.1, private"),
]
ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "2001:4860:4860::8888",
    "2606:4700:4700::1111",
    "64:ff9b::8.8.8.8",  # what DNS64 answers for an IPv4-only public host
    "2002:808:808::1",  # 6to4 of a public address
]


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_non_public_addresses_are_refused_with_their_class(address: str, reason: str) -> None:
    assert refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://[::1]:8080/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::127.0.0.1]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[2002:7f00:1::]/",
        "http://0.0.0.0:8000/",
        "https://10.0.0.5/",
    ],
)
def test_an_address_in_the_url_is_checked_without_asking_the_resolver(
    public_only: Settings, url: str
) -> None:
    resolver = Resolver(["8.8.8.8"])
    with pytest.raises(OutboundRefused, match="is a non-public address") as info:
        check_url(url, public_only, resolver)
    assert "VARIFLOW_ALLOW_PRIVATE_URLS" in info.value.message
    assert info.value.host == httpx.URL(url).host
    assert resolver.calls == []


def test_a_host_is_refused_when_any_of_its_addresses_is_not_public(public_only: Settings) -> None:
    resolver = Resolver(["8.8.8.8", "10.0.0.1"])
    with pytest.raises(OutboundRefused) as info:
        check_url("https://cdn.example/a.png", public_only, resolver)
    assert info.value.message.startswith(
        "host 'cdn.example' resolves to a non-public address (10.0.0.1: private)"
    )


def test_a_public_host_is_resolved_once_into_the_addresses_to_connect_to(
    public_only: Settings,
) -> None:
    resolver = Resolver(["8.8.8.8", "2001:4860:4860::8888", "8.8.8.8"])
    target = check_url("https://Cdn.Example:8443/a.png", public_only, resolver)
    assert target.addresses == ("8.8.8.8", "2001:4860:4860::8888")
    assert (target.host, target.port) == ("cdn.example", 8443)
    assert resolver.calls == [("cdn.example", 8443)]


def test_a_non_canonical_ipv4_spelling_is_judged_by_what_it_resolves_to(
    public_only: Settings,
) -> None:
    # 2130706433 is 127.0.0.1 to getaddrinfo (inet_aton): the answer is what is checked.
    with pytest.raises(OutboundRefused, match=r"127\.0\.0\.1: loopback"):
        check_url("http://2130706433/", public_only)


def test_private_addresses_are_allowed_when_configured(private_ok: Settings) -> None:
    target = check_url("http://localhost:8000/hook", private_ok, Resolver(["127.0.0.1"]))
    assert target.addresses == ("127.0.0.1",)
    assert check_url("http://[::1]/", private_ok).addresses == ("::1",)


@pytest.mark.parametrize(
    "url", ["ftp://cdn.example/a.png", "file:///etc/passwd", "http:///no-host", "gopher://x/"]
)
def test_only_http_urls_go_out(public_only: Settings, url: str) -> None:
    with pytest.raises(OutboundRefused, match=r"^not an http\(s\) URL"):
        check_url(url, public_only, Resolver(["8.8.8.8"]))


# --- a host that does not resolve -------------------------------------------------------


def test_an_unresolvable_host_is_a_permanent_refusal_naming_the_host(
    public_only: Settings,
) -> None:
    resolver = Resolver(nxdomain())
    with pytest.raises(UnresolvableHost) as info:
        check_url("https://gone.example/a.png", public_only, resolver)
    assert isinstance(info.value, OutboundRefused)
    assert not info.value.temporary
    assert info.value.host == "gone.example"
    assert info.value.message == "host 'gone.example' does not resolve (Name or service not known)"

    with pytest.raises(UnresolvableHost, match=r"'empty\.example' does not resolve"):
        check_url("https://empty.example/", public_only, Resolver([]))


def test_an_input_image_on_an_unresolvable_host_fails_the_job_at_once(
    public_only: Settings,
) -> None:
    with pytest.raises(InputImageError) as info:
        fetch_image(
            "https://gone.example/in.png",
            public_only,
            current().http,
            resolver=Resolver(nxdomain()),
        )
    assert isinstance(info.value, PermanentUpstreamError)
    assert info.value.code == ErrorCode.INVALID_INPUT
    assert "host 'gone.example' does not resolve" in info.value.message


def test_a_temporary_dns_failure_is_worth_retrying(public_only: Settings) -> None:
    again = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    with pytest.raises(DNSUnavailable, match=r"'flaky\.example' does not resolve"):
        get(public_only, "https://flaky.example/a.png", Resolver(again))
    with pytest.raises(TransientUpstreamError, match=r"flaky\.example"):
        fetch_image(
            "https://flaky.example/in.png", public_only, current().http, resolver=Resolver(again)
        )


def test_an_archive_download_and_a_notification_name_an_unresolvable_host(
    public_only: Settings,
) -> None:
    job = Job(
        id=uuid.uuid4(),
        provider="piapi",
        status="completed",
        result_urls=["https://gone.example/1.png"],
    )
    archived = archive_results(job, public_only, current().http, resolver=Resolver(nxdomain()))
    assert archived.urls == []
    assert archived.errors == [
        "https://gone.example/1.png: host 'gone.example' does not resolve "
        "(Name or service not known)"
    ]
    with pytest.raises(NotifyRefused, match=r"host 'gone\.example' does not resolve"):
        post_notification(
            "https://gone.example/hook",
            {},
            "msg_1",
            public_only,
            current().http,
            resolver=Resolver(nxdomain()),
        )


# --- the connection goes to the address that was checked -------------------------------


def test_the_request_targets_the_checked_ip_with_the_original_host_and_server_name(
    public_only: Settings,
) -> None:
    # A rebinding resolver: public on the check, loopback on any later question.
    resolver = Resolver(["93.184.215.14"], ["127.0.0.1"])
    seen: list[httpx.Request] = []

    def transport(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=PNG)

    client = httpx.Client(transport=httpx.MockTransport(transport))

    assert get(public_only, "https://images.example/cat.png", resolver, client=client) == (
        200,
        PNG,
    )

    [request] = seen
    assert (request.url.host, request.url.port, request.url.path) == (
        "93.184.215.14",
        None,
        "/cat.png",
    )
    assert request.headers["host"] == "images.example"
    assert request.extensions["sni_hostname"] == "images.example"
    assert request.headers["connection"] == "close"
    assert resolver.calls == [("images.example", 443)]
    # Every request resolves once, and a rebound answer is refused when it is checked.
    with pytest.raises(OutboundRefused, match=r"127\.0\.0\.1: loopback"):
        get(public_only, "https://images.example/cat.png", resolver, client=client)
    assert len(seen) == 1


def test_nothing_resolves_the_name_a_second_time(private_ok: Settings, server: Server) -> None:
    # rebind.test exists for this resolver only, and only on its first answer: the
    # request can reach the server only through the address that was checked.
    server.route("/in.png", answer(200, PNG, content_type="image/png"))
    resolver = Resolver(["127.0.0.1"], nxdomain())
    url = f"http://rebind.test:{server.port}/in.png"

    image = fetch_image(url, private_ok, current().http, resolver=resolver)

    assert image.content == PNG
    assert resolver.calls == [("rebind.test", server.port)]
    assert server.hits("/in.png") == [f"rebind.test:{server.port}"]


def test_a_checked_address_that_refuses_the_connection_gives_way_to_the_next(
    private_ok: Settings, server: Server
) -> None:
    server.route("/a.png", answer(200, PNG))
    # Nothing listens on 127.0.0.2 at this port (the server is bound to 127.0.0.1).
    resolver = Resolver(["127.0.0.2", "127.0.0.1"])
    assert get(private_ok, f"http://two.test:{server.port}/a.png", resolver) == (200, PNG)
    assert server.hits("/a.png") == [f"two.test:{server.port}"]


def _certificates(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for outbound.test only: (ca, cert, key)."""
    now = dt.datetime.now(dt.UTC)

    def name(common: str) -> Any:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("variflow test CA"))
        .issuer_name(name("variflow test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("outbound.test"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("outbound.test")]), False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_tls_to_the_checked_ip_sends_the_host_name_and_verifies_it(
    private_ok: Settings, tmp_path: Path
) -> None:
    ca, cert, key = _certificates(tmp_path)
    names: list[str | None] = []
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    server_tls.sni_callback = lambda _sock, sni, _ctx: names.append(sni)
    client = httpx.Client(verify=ssl.create_default_context(cafile=str(ca)))
    for srv in running(Server(tls=server_tls)):
        srv.route("/tls", answer(200, b"over tls"))

        assert get(
            private_ok,
            f"https://outbound.test:{srv.port}/tls",
            Resolver(["127.0.0.1"]),
            client=client,
        ) == (200, b"over tls")
        assert names == ["outbound.test"]  # SNI: the name, though the connection went to the IP
        assert srv.hits("/tls") == [f"outbound.test:{srv.port}"]

        # The certificate is checked against the URL's name, not the address.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            get(
                private_ok,
                f"https://other.test:{srv.port}/tls",
                Resolver(["127.0.0.1"]),
                client=client,
            )
        assert len(srv.hits("/tls")) == 1


# --- no redirects -----------------------------------------------------------------------


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_an_answer_never_followed(
    private_ok: Settings, server: Server, code: int
) -> None:
    target = server.route("/internal", answer(200, b"secret"))
    url = server.route("/moved", answer(code, b"", location=target))

    assert get(private_ok, url) == (code, b"")
    with pytest.raises(InputImageError, match="redirect"):
        fetch_image(url, private_ok, current().http)
    with pytest.raises(NotifyFailed, match=f"^HTTP {code}$"):
        post_notification(url, {}, "msg_1", private_ok, current().http)
    assert server.hits("/internal") == []


# --- the size cap -----------------------------------------------------------------------


def test_a_body_over_the_cap_is_refused_as_declared_or_as_it_streams(
    private_ok: Settings, server: Server
) -> None:
    declared = server.route("/declared", answer(200, b"x" * 101))

    def streamed(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for _ in range(20):
            handler.wfile.write(b"a\r\n0123456789\r\n")
        handler.wfile.write(b"0\r\n\r\n")

    chunked = server.route("/chunked", streamed)

    with pytest.raises(ResponseTooLarge, match=r"^over the limit of 100 bytes \(101 declared\)$"):
        get(private_ok, declared, max_bytes=100)
    with pytest.raises(ResponseTooLarge, match=r"^over the limit of 100 bytes$"):
        get(private_ok, chunked, max_bytes=100)
    assert get(private_ok, chunked, max_bytes=200) == (200, b"0123456789" * 20)

    settings = private_ok.model_copy(update={"max_image_bytes": 100})
    with pytest.raises(InputImageError, match=r"^image is over the limit of 100 bytes"):
        fetch_image(chunked, settings, current().http)


# --- the total-time cap -----------------------------------------------------------------


def trickle(every: float, count: int, then_stall: float = 0.0) -> Handler:
    """Headers at once, then one byte every ``every`` seconds (of a body never complete)."""

    def handler(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", "100000")
        request.end_headers()
        request.wfile.flush()
        for _ in range(count):
            time.sleep(every)
            request.wfile.write(b"x")
            request.wfile.flush()
        time.sleep(then_stall)

    return handler


def test_a_server_that_trickles_bytes_is_cut_off_at_the_total_time(
    private_ok: Settings, server: Server
) -> None:
    url = server.route("/trickle", trickle(every=0.05, count=400))  # 20 s in all
    started = time.monotonic()
    with pytest.raises(TotalTimeout, match=r"total time of 0\.6s"):
        get(private_ok, url, timeout=0.6)
    assert time.monotonic() - started < 1.2  # each read was quick: per-phase timeouts never fire

    started = time.monotonic()
    # fetch_image's budget is 30 s; a shorter one shows the same path quickly.
    with (
        pytest.MonkeyPatch.context() as patch,
        pytest.raises(TransientUpstreamError, match="TotalTimeout"),
    ):
        patch.setattr("worker.images.FETCH_TIMEOUT", 0.6)
        fetch_image(url, private_ok, current().http)
    assert time.monotonic() - started < 1.2


def test_a_read_that_blocks_past_the_budget_is_cut_off_by_the_watchdog(
    private_ok: Settings, server: Server
) -> None:
    # Bytes at 0.3, 0.6 and 0.9 s, then silence: the last read starts with ~1 s of
    # read timeout left, so only the watchdog can end it at the 1 s budget.
    url = server.route("/stall", trickle(every=0.3, count=3, then_stall=5.0))
    started = time.monotonic()
    with pytest.raises(TotalTimeout) as info:
        get(private_ok, url, timeout=1.0)
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 1.5
    assert isinstance(info.value, httpx.TimeoutException)


def test_a_server_that_never_answers_is_a_timeout_within_the_budget(
    private_ok: Settings, server: Server
) -> None:
    url = server.route("/silent", lambda handler: time.sleep(5))
    started = time.monotonic()
    with pytest.raises(httpx.TimeoutException):
        get(private_ok, url, timeout=0.5)
    assert time.monotonic() - started < 1.0
    with pytest.raises(NotifyFailed, match="Timeout"):
        post_notification(
            url, {}, "msg_1", private_ok.model_copy(update={"notify_timeout": 0.5}), current().http
        )


# --- notify_url: checked at submit, and again when sent ---------------------------------


def job_count() -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://127.0.0.1:8080/hook", "127.0.0.1: loopback"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254: link-local"),
        ("http://[::ffff:127.0.0.1]/hook", "::ffff:7f00:1: IPv4-mapped 127.0.0.1"),
        ("http://[::127.0.0.1]/hook", "::7f00:1: IPv4-compatible 127.0.0.1"),
    ],
)
def test_a_notify_url_on_a_non_public_address_is_refused_at_submit(
    public_only: Settings, url: str, address: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        submit_variation("piapi", **PIAPI, notify_url=url)
    assert info.value.field == "notify_url"
    assert "non-public address" in info.value.message
    assert address in info.value.message
    assert job_count() == 0


def test_a_notify_url_whose_host_does_not_resolve_is_kept_and_checked_when_sent(
    public_only: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # DNS may be down for a moment at submit: the job is accepted, the name noted,
    # and sending resolves it again (refusing it, naming the host, if it still fails).
    monkeypatch.setattr(outbound, "system_resolver", Resolver(nxdomain()))
    job = submit_variation("piapi", **PIAPI, notify_url="https://hooks.nowhere.example/done")
    assert job.status == "queued"
    assert "host 'hooks.nowhere.example' does not resolve" in caplog.text
    assert job_count() == 1


def test_a_notify_url_on_a_public_host_is_stored(
    public_only: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolver = Resolver(["93.184.215.14"])
    monkeypatch.setattr(outbound, "system_resolver", resolver)
    job = submit_variation("piapi", **PIAPI, notify_url="https://app.example/hooks/variflow")
    with session_scope() as session:
        stored = session.get(Job, job.id)
        assert stored is not None and stored.notify_url == "https://app.example/hooks/variflow"
    assert resolver.calls == [("app.example", 443)]


def test_a_loopback_notify_url_is_accepted_when_private_urls_are_allowed(
    private_ok: Settings,
) -> None:
    job = submit_variation("piapi", **PIAPI, notify_url="http://127.0.0.1:8080/hook")
    assert job.status == "queued"


@pytest.mark.parametrize("host", ["127.0.0.1", "169.254.169.254"])
def test_a_notification_to_a_non_public_address_is_not_sent(
    public_only: Settings, server: Server, host: str
) -> None:
    url = server.route("/hook", answer(204)).replace("127.0.0.1", host)
    with pytest.raises(NotifyRefused, match=f"host '{host}' is a non-public address"):
        post_notification(url, {}, "msg_1", public_only, current().http)
    assert server.requests == []


def test_a_notify_url_that_rebinds_to_loopback_after_submit_is_refused_when_sent(
    public_only: Settings, server: Server
) -> None:
    url = f"http://app.example:{server.port}/hook"
    server.route("/hook", answer(204))
    check_url(url, public_only, Resolver(["93.184.215.14"]))  # as at submit
    with pytest.raises(NotifyRefused, match=r"resolves to a non-public address \(127\.0\.0\.1"):
        post_notification(
            url, {}, "msg_1", public_only, current().http, resolver=Resolver(["127.0.0.1"])
        )
    assert server.requests == []


def test_notify_gives_up_at_once_on_a_refused_notify_url(
    public_only: Settings, server: Server
) -> None:
    url = server.route("/hook", answer(204))
    now = utcnow()
    job_id = uuid.uuid4()
    with session_scope() as session:
        session.add(
            Job(
                id=job_id,
                provider="piapi",
                status="completed",
                params=PIAPI,
                upstream_task_id="t-1",
                deadline=now + timedelta(hours=1),
                created_at=now,
                updated_at=now,
                completed_at=now,
                notify_url=url,
            )
        )

    assert notify(job_id, public_only, current().http, current().db) is True  # no retry

    [event] = [e.message for e in get_job(job_id).events if e.source == "finalize"]
    assert event is not None
    assert event.startswith(f"notification to 127.0.0.1:{server.port} not sent: host '127.0.0.1'")
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.notified_at is None
    assert server.requests == []
