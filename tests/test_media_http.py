"""http(s) media: URL policy, DNS pinning, redirects, limits, the byte-bounded LRU and MediaLoader.

Every test talks only to a server it starts on 127.0.0.1. Two autouse guards keep it that way even if the code
under test breaks: DNS is answered from an in-test table (no real lookups), and any attempt to connect to an
address other than 127.0.0.1 fails the test before a socket is opened.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Coroutine
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from conftest import free_port, pattern_image, png_bytes, tone, wav_bytes
from mmtriton.media import audio as audio_module
from mmtriton.media import http_client, url_policy
from mmtriton.media import image as image_module
from mmtriton.media.cache import ByteLRU
from mmtriton.media.errors import MediaUnavailable
from mmtriton.media.http_client import fetch_http
from mmtriton.media.loader import MediaLoader
from mmtriton.media.policy import MediaPolicy
from mmtriton.media.url_policy import address_refusal, check_url
from mmtriton.protocol import InvalidInput, MediaItem
from mmtriton.settings import Settings

PNG = png_bytes(pattern_image(64, 48, 3))
PNG2 = png_bytes(pattern_image(40, 30, 4))
WAV = wav_bytes(tone(0.5, 16000), 16000)


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    pattern_image(16, 16, 0).save(buf, format="GIF")
    return buf.getvalue()


GIF = gif_bytes()
LOCAL = Settings(allow_loopback_media_urls=True, media_fetch_timeout_s=5.0, media_connect_timeout_s=2.0)


def policy(**settings: Any) -> MediaPolicy:
    return MediaPolicy.from_settings(Settings(**settings))


# ------------------------------------------------------------------------------------------- local server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self.server.media.record(self.path, self.headers.get("Host", ""))
        path, _, query = self.path.partition("?")
        try:
            self._route(path, urllib.parse.parse_qs(query))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timeout, size cap): expected

    def _route(self, path: str, query: dict[str, list[str]]) -> None:
        bodies = {"/img.png": (PNG, "image/png"), "/img2.png": (PNG2, "image/png"),
                  "/img.gif": (GIF, "image/gif"), "/tone.wav": (WAV, "audio/wav")}
        if path in bodies:
            self._send(200, *bodies[path])
        elif path == "/slow":
            time.sleep(2.0)
            self._send(200, PNG, "image/png")
        elif path == "/slow-body":
            self._slow_body()
        elif path == "/big-declared":
            self._big_declared()
        elif path == "/big-chunked":
            self._endless_chunked()
        elif path.startswith("/r/"):
            hops = int(path[3:])
            # Relative Locations down the chain, an absolute one at the end.
            location = f"/r/{hops - 1}" if hops > 0 else f"http://127.0.0.1:{self.server.server_port}/img.png"
            self._redirect(302 if hops % 2 else 301, location)
        elif path == "/to":
            self._redirect(302, query["u"][0])
        elif path.startswith("/status/"):
            self._send(int(path[8:]), b"upstream says no", "text/plain")
        elif path == "/drop":
            self._drop_mid_body()
        elif path == "/no-location":
            self._send(302, b"", "text/plain")
        else:
            self._send(404, b"not found", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, status: int, location: str) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _slow_body(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG[:10])
        self.wfile.flush()
        time.sleep(2.0)
        self.close_connection = True

    def _drop_mid_body(self) -> None:
        # Declares the whole PNG, sends 10 bytes, hangs up: a dropped connection, not a slow one.
        self.send_response(200)
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG[:10])
        self.wfile.flush()
        self.close_connection = True

    def _big_declared(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "10000000")
        self.end_headers()
        self.wfile.write(b"\0" * 100)
        self.close_connection = True

    def _endless_chunked(self) -> None:
        # No Content-Length and no end: only a client that stops at its cap finishes before its timeout.
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"\0" * 16384
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    media: MediaServer


class MediaServer:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.media = self
        self.scheme = "https" if tls else "http"
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_port
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (path with query, Host header)
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def record(self, path: str, host: str) -> None:
        with self._lock:
            self.requests.append((path, host))

    def count(self, path: str) -> int:
        with self._lock:
            return sum(1 for p, _ in self.requests if p == path)

    def hosts(self, path: str) -> list[str]:
        with self._lock:
            return [h for p, h in self.requests if p == path]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def server():
    srv = MediaServer()
    yield srv
    srv.stop()


@dataclass
class TLSServer:
    server: MediaServer
    ca_file: Path
    sni: list[str]  # server names clients asked for


def make_certificates(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``name`` signed by it: (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, key: Any, issuer: x509.Name, signer: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
        )
        if ca:
            usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
            builder = builder.add_extension(usage, critical=True)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mmtriton test CA")])
    ca = build("mmtriton test CA", ca_key, ca_name, ca_key, ca=True)
    cert = build(name, key, ca_name, ca_key, ca=False)
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return paths


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    ca_file, cert_file, key_file = make_certificates(tmp_path_factory.mktemp("tls"), "media.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    sni: list[str] = []
    context.sni_callback = lambda _sock, name, _ctx: sni.append(name)
    srv = MediaServer(tls=context)
    yield TLSServer(srv, ca_file, sni)
    srv.stop()


@dataclass
class FakeDNS:
    """name → addresses (or seconds to hang); unknown names fail like NXDOMAIN."""

    table: dict[str, list[str] | float] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    unpinned: list[str] = field(default_factory=list)  # lookups that bypassed http_client._getaddrinfo

    async def getaddrinfo(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        answer = self.table.get(host)
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if isinstance(answer, float):
            await asyncio.sleep(answer)
            return []
        return list(answer)


@pytest.fixture(autouse=True)
def dns(monkeypatch) -> FakeDNS:
    fake = FakeDNS()
    monkeypatch.setattr(http_client, "_getaddrinfo", fake.getaddrinfo)
    real = socket.getaddrinfo

    def literals_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        # Anything else resolving a name (aiohttp's own resolver, say) would be a pinning bug and real DNS traffic.
        if host is not None and url_policy.ip_literal(str(host)) is None:
            fake.unpinned.append(str(host))
            raise socket.gaierror(socket.EAI_NONAME, f"test guard: unexpected DNS lookup of {host}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", literals_only)
    return fake


@pytest.fixture(autouse=True)
def only_loopback_connections(monkeypatch):
    real = http_client._get_from

    async def guarded(address: str, *args: Any, **kwargs: Any) -> Any:
        assert address == "127.0.0.1", f"the code under test tried to connect to {address}"
        return await real(address, *args, **kwargs)

    monkeypatch.setattr(http_client, "_get_from", guarded)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
    """Run ``coro`` on a fresh loop with a deadline, then close that loop's shared session."""
    async def main() -> Any:
        try:
            return await asyncio.wait_for(coro, timeout)
        finally:
            await http_client.close()

    return asyncio.run(main())


def fetch(url: str, settings: Settings = LOCAL, where: str = "image_url[0]") -> bytes:
    return run(fetch_http(url, where, MediaPolicy.from_settings(settings)))


# --------------------------------------------------------------------------------------------- policy


@pytest.mark.parametrize("address, category", [
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"), ("100.64.0.1", "private"),
    ("fd12:3456::1", "private"),
    ("127.0.0.1", "loopback"), ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"), ("64:ff9b::7f00:1", "loopback"), ("2002:7f00:1::", "loopback"),
    ("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"),
    ("100.100.100.200", "cloud metadata"), ("169.254.170.2", "cloud metadata"),
    ("fe80::1", "link-local"), ("169.254.1.1", "link-local"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("0.1.2.3", "unspecified"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"),
])
def test_policy_refuses_non_public_addresses_by_default(address, category):
    reason = address_refusal(address)
    assert reason is not None and f"{category} address" in reason


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "::ffff:8.8.8.8"])
def test_policy_allows_public_addresses(address):
    assert address_refusal(address) is None


def test_policy_switches_open_only_their_own_category():
    assert address_refusal("127.0.0.1", allow_loopback=True) is None
    assert address_refusal("::ffff:127.0.0.1", allow_loopback=True) is None
    assert "private" in address_refusal("10.0.0.1", allow_loopback=True)
    assert address_refusal("10.0.0.1", allow_private=True) is None
    assert address_refusal("100.64.0.1", allow_private=True) is None
    assert "loopback" in address_refusal("127.0.0.1", allow_private=True)
    # Metadata endpoints stay refused with both switches on, including those inside private ranges.
    for address in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "fe80::1", "0.0.0.0"):
        assert address_refusal(address, allow_loopback=True, allow_private=True) is not None


@pytest.mark.parametrize("url, message", [
    ("http://10.0.0.1/a.png", "private address 10.0.0.1"),
    ("http://[::ffff:127.0.0.1]/a.png", "loopback address 127.0.0.1"),
    ("http://[::1]:8080/a.png", "loopback address ::1"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata address"),
    ("http://metadata.google.internal/computeMetadata/v1/", "cloud metadata host"),
    ("http://METADATA.Google.Internal./computeMetadata/v1/", "cloud metadata host"),
    ("http://localhost:8000/a.png", "loopback name"),
    ("http://media.localhost/a.png", "loopback name"),
    ("ftp://example.com/a.png", "unsupported URL scheme 'ftp'"),
    ("http://user:secret@example.com/a.png", "credentials in the URL"),
])
def test_static_policy_refuses_without_dns_or_connecting(url, message, dns):
    with pytest.raises(InvalidInput, match=rf"^image_url\[3\]: .* refused by URL policy: .*{message}"):
        check_url(url, "image_url[3]", policy())
    assert dns.calls == []


@pytest.mark.parametrize("url, message", [
    ("http://xn--/a.png", "is not a valid URL"),  # yarl decodes IDNA lazily: this raised UnicodeError before
    ("http://[::1", "is not a valid URL"),  # and this a ValueError from the message's own urlsplit
])
def test_unparseable_urls_are_client_errors(url, message):
    with pytest.raises(InvalidInput, match=rf"^w: .*{message}"):
        check_url(url, "w", policy())


def test_static_policy_lets_public_names_through_to_resolution():
    target = check_url("https://Example.COM/a.png", "w", policy())
    assert (target.host, target.port, target.scheme) == ("example.com", 443, "https")


@pytest.mark.parametrize("a, b", [
    ("HTTP://Example.COM:80/a.png#frag", "http://example.com/a.png"),
    ("https://example.com:443", "https://example.com/"),
    ("http://example.com./a.png?x=1#y", "http://example.com/a.png?x=1"),
    ("http://[2001:DB8::1]:80/a", "http://[2001:db8::1]/a"),
])
def test_normalised_url(a, b):
    private_ok = policy(allow_private_media_urls=True)  # 2001:db8:: is documentation space
    assert check_url(a, "w", private_ok).normalized == b


def test_normalised_url_keeps_what_matters():
    assert check_url("http://example.com:8080/a", "w", policy()).normalized == "http://example.com:8080/a"
    assert check_url("http://example.com/a?x=1", "w", policy()).normalized != "http://example.com/a?x=2"


def test_error_messages_elide_the_query(server):
    with pytest.raises(InvalidInput) as info:
        fetch(server.url("/missing?X-Amz-Signature=secret"))
    assert "secret" not in str(info.value) and "/missing?…" in str(info.value)


# -------------------------------------------------------------------------------------------- fetching


def test_ok(server):
    assert fetch(server.url("/img.png?case=ok")) == PNG
    assert server.hosts("/img.png?case=ok") == [f"127.0.0.1:{server.port}"]


def test_404_names_item_and_status(server):
    url = server.url("/missing")
    with pytest.raises(InvalidInput, match=rf"^image_url\[0\]: http 404 fetching {url}$"):
        fetch(url)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_upstream_trouble_is_unavailable_not_the_clients_fault(server, status):
    url = server.url(f"/status/{status}")
    with pytest.raises(MediaUnavailable, match=rf"^image_url\[0\]: http {status} fetching {url}$") as info:
        fetch(url)
    assert not isinstance(info.value, InvalidInput)


@pytest.mark.parametrize("status", [400, 403, 404, 410, 451])
def test_upstream_4xx_is_the_clients_fault(server, status):
    with pytest.raises(InvalidInput, match=rf"^image_url\[0\]: http {status} fetching") as info:
        fetch(server.url(f"/status/{status}"))
    assert not isinstance(info.value, MediaUnavailable)


def test_connection_dropped_mid_body_is_unavailable(server):
    with pytest.raises(MediaUnavailable, match=r"^image_url\[0\]: fetching .*/drop failed \(ClientPayloadError"):
        fetch(server.url("/drop"))


def test_timeout_within_configured_total(server):
    settings = Settings(allow_loopback_media_urls=True, media_fetch_timeout_s=0.3)
    for path in ("/slow", "/slow-body"):
        start = time.monotonic()
        with pytest.raises(MediaUnavailable, match=r"image_url\[0\]: timed out after 0.3 s fetching"):
            fetch(server.url(path), settings)
        assert time.monotonic() - start < 1.5


def test_size_cap_declared_and_streamed(server):
    settings = Settings(allow_loopback_media_urls=True, max_media_bytes=1000, media_fetch_timeout_s=5.0)
    with pytest.raises(InvalidInput, match=r"response too large .*: 10000000 bytes, limit is 1000"):
        fetch(server.url("/big-declared"), settings)
    # The body never ends: only stopping at the cap beats the 5 s timeout.
    start = time.monotonic()
    with pytest.raises(InvalidInput, match=r"response too large .*: over 1000 bytes"):
        fetch(server.url("/big-chunked"), settings)
    assert time.monotonic() - start < 3


def test_size_cap_stops_reading_within_one_chunk(server, monkeypatch):
    seen: list[int] = []
    real = http_client._read_capped

    class CountingBody:  # stands in for the response: same content_length, body chunks counted as read
        def __init__(self, response: aiohttp.ClientResponse):
            self.content_length, self.content, self._stream = response.content_length, self, response.content

        async def iter_chunked(self, n: int):
            async for chunk in self._stream.iter_chunked(n):
                seen.append(len(chunk))
                yield chunk

    async def spy(response: aiohttp.ClientResponse, *args: Any) -> bytes:
        return await real(CountingBody(response), *args)

    monkeypatch.setattr(http_client, "_read_capped", spy)
    settings = Settings(allow_loopback_media_urls=True, max_media_bytes=100_000)
    with pytest.raises(InvalidInput, match="too large"):
        fetch(server.url("/big-chunked"), settings)
    assert 100_000 < sum(seen) <= 100_000 + http_client.CHUNK_BYTES


def test_connection_refused(server):
    url = f"http://127.0.0.1:{free_port()}/a.png"
    with pytest.raises(MediaUnavailable, match=r"^image_url\[0\]: connection refused fetching"):
        fetch(url)


def test_loopback_refused_by_default_before_any_request(server):
    before = len(server.requests)
    with pytest.raises(InvalidInput, match=r"refused by URL policy: loopback address 127.0.0.1"):
        fetch(server.url("/img.png"), Settings())
    assert len(server.requests) == before


def test_redirects_followed_up_to_the_limit(server):
    settings = Settings(allow_loopback_media_urls=True, media_max_redirects=3)
    assert fetch(server.url("/r/2"), settings) == PNG  # 3 redirects, relative then absolute Locations
    before = server.count("/img.png")
    with pytest.raises(InvalidInput, match=r"too many redirects fetching .*/r/3 \(limit 3\)"):
        fetch(server.url("/r/3"), settings)  # 4 redirects
    assert server.count("/img.png") == before  # the chain was cut before its end
    with pytest.raises(InvalidInput, match="too many redirects"):
        fetch(server.url("/r/0"), Settings(allow_loopback_media_urls=True, media_max_redirects=0))


@pytest.mark.parametrize("target, message", [
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata address 169.254.169.254"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata address"),
    ("http://10.0.0.1/a.png", "private address 10.0.0.1"),
    ("http://metadata.google.internal/computeMetadata/v1/", "cloud metadata host"),
    ("http://internal.test/a.png", "internal.test resolves to private address 192.168.1.10"),
    ("file:///etc/passwd", "unsupported URL scheme 'file'"),
])
def test_every_redirect_hop_is_rechecked(server, dns, target, message):
    dns.table["internal.test"] = ["192.168.1.10"]
    url = server.url("/to?" + urllib.parse.urlencode({"u": target}))
    with pytest.raises(InvalidInput, match=rf"^image_url\[0\]: .* refused by URL policy: .*{message}"):
        fetch(url)


def test_redirect_without_location(server):
    with pytest.raises(InvalidInput, match="http 302 without a Location header"):
        fetch(server.url("/no-location"))


def test_dns_is_pinned_to_the_checked_address(server, dns):
    # aiohttp is handed the checked IP and never resolves the name: media.test exists only in the fake table.
    dns.table["media.test"] = ["127.0.0.1"]
    assert fetch(f"http://media.test:{server.port}/img.png?case=pin") == PNG
    assert dns.calls == ["media.test"] and dns.unpinned == []
    assert server.hosts("/img.png?case=pin") == [f"media.test:{server.port}"]


def test_every_resolved_address_is_checked(server, dns):
    dns.table["mixed.test"] = ["127.0.0.1", "10.0.0.1"]
    with pytest.raises(InvalidInput, match="mixed.test resolves to private address 10.0.0.1"):
        fetch(f"http://mixed.test:{server.port}/img.png?case=mixed")
    assert server.count("/img.png?case=mixed") == 0


def test_next_address_tried_when_one_cannot_connect(server, dns, monkeypatch):
    dns.table["two.test"] = ["203.0.113.7", "127.0.0.1"]
    tried: list[str] = []
    real = http_client._get_from  # the loopback guard

    async def unreachable_first(address: str, *args: Any) -> Any:
        tried.append(address)
        if address != "127.0.0.1":
            raise aiohttp.ConnectionTimeoutError("simulated: no route")  # never connects anywhere
        return await real(address, *args)

    monkeypatch.setattr(http_client, "_get_from", unreachable_first)
    settings = Settings(allow_loopback_media_urls=True, allow_private_media_urls=True)
    assert fetch(f"http://two.test:{server.port}/img.png", settings) == PNG
    assert tried == ["203.0.113.7", "127.0.0.1"]


def test_https_connects_to_the_pinned_ip_but_verifies_the_name(tls_server, dns, monkeypatch):
    srv = tls_server.server
    dns.table.update({"media.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    # By default only the system CAs are trusted: the test CA's certificate is refused.
    with pytest.raises(InvalidInput, match=r"^image_url\[0\]: TLS certificate error .* fetching https://media.test"):
        fetch(srv.url("/img.png", host="media.test"))
    trusting = ssl.create_default_context(cafile=str(tls_server.ca_file))
    monkeypatch.setattr(http_client, "_tls_context", lambda: trusting)
    assert fetch(srv.url("/img.png?case=tls", host="media.test")) == PNG
    assert tls_server.sni[-1] == "media.test" and srv.hosts("/img.png?case=tls") == [f"media.test:{srv.port}"]
    # Same IP, trusted CA, but the certificate is for media.test: the name is what gets checked.
    with pytest.raises(InvalidInput, match="TLS certificate error"):
        fetch(srv.url("/img.png", host="other.test"))
    assert dns.unpinned == []


def test_dns_failure_and_timeout(dns):
    with pytest.raises(InvalidInput, match=r"^image_url\[0\]: DNS lookup for nxdomain.test failed"):
        fetch("http://nxdomain.test/a.png")
    dns.table["hang.test"] = 5.0
    start = time.monotonic()
    with pytest.raises(MediaUnavailable, match="DNS lookup for hang.test timed out after 0.2 s"):
        fetch("http://hang.test/a.png", Settings(media_connect_timeout_s=0.2))
    assert time.monotonic() - start < 1.5


def test_one_session_per_loop_reused_and_closed(server):
    async def twice() -> tuple[aiohttp.ClientSession, aiohttp.ClientSession]:
        await fetch_http(server.url("/img.png"), "w", MediaPolicy.from_settings(LOCAL))
        first = http_client.session()
        await fetch_http(server.url("/img.png"), "w", MediaPolicy.from_settings(LOCAL))
        return first, http_client.session()

    first, second = run(twice())
    assert first is second and first.closed  # run() closed it


# ------------------------------------------------------------------------------------------------ LRU


def test_lru_evicts_least_recently_used_not_first_in():
    cache: ByteLRU[str, bytes] = ByteLRU(30, len)
    for key in "abc":
        cache.put(key, b"x" * 10)
    assert cache.get("a") is not None  # a is now the most recently used; b the least
    cache.put("d", b"x" * 10)
    assert "a" in cache and "b" not in cache and "c" in cache and "d" in cache
    cache.get("c")
    cache.put("e", b"x" * 10)
    assert "a" not in cache and "c" in cache
    assert cache.stats()["evictions"] == 2


def test_lru_respects_byte_budget_and_skips_oversized():
    cache: ByteLRU[str, bytes] = ByteLRU(100, len)
    for i in range(20):
        cache.put(f"k{i}", b"x" * (7 + i % 5))
        assert cache.bytes <= 100
    assert cache.bytes == sum(len(cache.pop(k) or b"") for k in [f"k{i}" for i in range(20)])
    cache.put("small", b"x" * 40)
    assert cache.put("huge", b"x" * 101) is False
    assert "huge" not in cache and "small" in cache and cache.bytes == 40
    # Replacing a key with an oversized value drops the stale entry instead of keeping it.
    assert cache.put("small", b"x" * 200) is False and "small" not in cache and cache.bytes == 0


def test_lru_counters_and_replacement():
    cache: ByteLRU[str, bytes] = ByteLRU(100, len)
    assert cache.get("a") is None
    cache.put("a", b"1234")
    cache.put("a", b"12")
    assert cache.get("a") == b"12" and cache.get("a") == b"12"
    assert cache.stats() == {"hits": 2, "misses": 1, "evictions": 0, "bytes": 2, "items": 1}


def test_lru_is_consistent_under_threads():
    cache: ByteLRU[int, bytes] = ByteLRU(1000, len)

    def hammer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(2000):
            key = int(rng.integers(0, 50))
            if rng.random() < 0.5:
                cache.put(key, b"x" * int(rng.integers(1, 60)))
            else:
                cache.get(key)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    stats = cache.stats()
    assert stats["bytes"] <= 1000 and stats["hits"] + stats["misses"] > 0
    assert stats["bytes"] == sum(len(v) for v in (cache.pop(k) for k in range(50)) if v is not None)


# ---------------------------------------------------------------------------------------------- loader


def image_item(url: str, where: str = "image_url[0]") -> MediaItem:
    return MediaItem("image", url, where)


def test_loader_same_http_image_twice_is_fetched_once(server):
    loader = MediaLoader(LOCAL)
    url = server.url("/img.png?case=twice")

    async def twice() -> tuple[Any, Any]:
        return await loader.load_image(image_item(url)), await loader.load_image(image_item(url))

    first, second = run(twice())
    assert first.size == (64, 48) and first.mode == "RGB" and second is first
    assert server.count("/img.png?case=twice") == 1
    assert loader.stats()["hits"] == 1 and loader.stats()["misses"] == 1 and loader.stats()["bytes"] == 64 * 48 * 3


def test_loader_equivalent_urls_share_an_entry(server):
    loader = MediaLoader(LOCAL)
    a = f"http://127.0.0.1:{server.port}/img.png?case=norm#one"
    b = f"HTTP://127.0.0.1:{server.port}/img.png?case=norm#two"

    async def both() -> None:
        await loader.load_image(image_item(a))
        await loader.load_image(image_item(b))

    run(both())
    assert server.count("/img.png?case=norm") == 1 and loader.stats()["hits"] == 1


def test_loader_caches_a_data_uri_by_the_uri_and_a_file_by_its_bytes(tmp_path):
    """A data: URI is keyed before its base64 is decoded, a file after it is read, so the same bytes both ways
    are two decoded-media entries (the embedding cache, keyed by the decoded pixels, has one)."""
    (tmp_path / "a.png").write_bytes(PNG2)
    settings = Settings(allowed_local_media_dirs=(str(tmp_path),))
    loader = MediaLoader(settings)
    data_uri = "data:image/png;base64," + base64.b64encode(PNG2).decode()

    async def three() -> None:
        await loader.load_image(image_item(data_uri))
        await loader.load_image(image_item(data_uri, "image_url[1]"))
        await loader.load_image(image_item(f"file://{tmp_path / 'a.png'}", "image_url[2]"))
        await loader.load_image(image_item(f"file://{tmp_path / 'a.png'}", "image_url[3]"))

    run(three())
    assert loader.stats()["hits"] == 2 and loader.stats()["items"] == 2


def test_loader_decodes_off_the_event_loop(monkeypatch):
    threads: list[threading.Thread] = []
    real = image_module.decode_image

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(image_module, "decode_image", spy)
    data_uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    run(MediaLoader(Settings()).load_image(image_item(data_uri)))
    assert threads and threads[0] is not threading.main_thread()


def test_loader_cache_is_bounded(server):
    # Room for the 64x48 image or the 40x30 one, not both: loading the second evicts the first.
    loader = MediaLoader(Settings(allow_loopback_media_urls=True, media_cache_bytes=64 * 48 * 3 + 100))

    async def three() -> None:
        for path in ("/img.png?case=bound", "/img2.png?case=bound", "/img.png?case=bound"):
            await loader.load_image(image_item(server.url(path)))

    run(three())
    assert loader.stats()["evictions"] == 2 and loader.stats()["hits"] == 0
    assert server.count("/img.png?case=bound") == 2


def test_loader_refuses_other_formats_over_http_by_name(server):
    with pytest.raises(InvalidInput, match=r"^image_url\[0\]: image format GIF is not allowed"):
        run(MediaLoader(LOCAL).load_image(image_item(server.url("/img.gif"))))


def test_loader_audio_over_http(server):
    # The first decode imports librosa's resampler (seconds on a loaded machine): not what the deadline measures.
    audio_module.decode_audio(WAV, "warm-up", 8000, 10.0)
    wave = run(MediaLoader(LOCAL).load_audio(MediaItem("audio", server.url("/tone.wav"), "audio_url[0]"), 8000))
    assert wave.dtype == np.float32 and abs(wave.size - 4000) <= 2


def test_loader_http_errors_and_policy(server):
    loader = MediaLoader(Settings())
    with pytest.raises(InvalidInput, match="refused by URL policy"):
        run(loader.load_image(image_item(server.url("/img.png"))))
    with pytest.raises(InvalidInput, match=r"image_url\[2\]: http 404"):
        run(MediaLoader(LOCAL).load_image(image_item(server.url("/missing"), "image_url[2]")))
    assert loader.stats()["items"] == 0
