"""http(s) media fetching: a URL policy against SSRF, DNS pinning, redirects re-checked hop by hop, a size cap.

DNS pinning: we resolve the host name ourselves (in a worker thread, with a timeout), check *every* address it
resolves to, then connect to a checked address by IP literal, sending the real name in the ``Host`` header and,
for https, as the TLS server name (SNI and certificate check still use the name). aiohttp therefore never looks
the name up itself, so a rebinding DNS server gets no second lookup to answer differently. aiohttp keys its
connection pool by (IP, port, TLS server name), so a reused connection always goes to an address that this very
request has just checked. No proxy is ever used (``trust_env=False``): a proxy would resolve the name itself.

Every problem raises :class:`~mmtriton.protocol.InvalidInput` naming the item (``where``) and the URL.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
import threading
import urllib.parse
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp
from yarl import URL

from mmtriton.protocol import InvalidInput
from mmtriton.settings import Settings

HTTP_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 64 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud instance-metadata endpoints: refused whatever the allow_* settings say (they hand out credentials).
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean
    "169.254.170.2",  # AWS ECS task metadata
    "fd00:ec2::254",  # AWS IMDS over IPv6 (a ULA, so allow_private alone would let it through)
    "100.100.100.200",  # Alibaba Cloud (CGNAT range, likewise)
    "192.0.0.192",  # Oracle Cloud (legacy)
    "168.63.129.16",  # Azure wire server: a public address, only this list catches it
))
METADATA_HOSTNAMES = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal",
    "metadata.tencentyun.com",
})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")

_LOOPBACK_HINT = "set MMT_ALLOW_LOOPBACK_MEDIA_URLS=1 to allow"
_PRIVATE_HINT = "set MMT_ALLOW_PRIVATE_MEDIA_URLS=1 to allow"


# ---------------------------------------------------------------------------------------------- URL policy


def address_refusal(
    address: str | IPAddress, *, allow_loopback: bool = False, allow_private: bool = False
) -> str | None:
    """Why media may not be fetched from ``address``, or None when it may. Pure: connects to nothing."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        # ::ffff:127.0.0.1, 64:ff9b::a00:1, 2002:a00:1:: reach the IPv4 address inside: judge that one.
        reason = address_refusal(embedded, allow_loopback=allow_loopback, allow_private=allow_private)
        return None if reason is None else f"IPv6 address {ip} embedding {reason}"
    if ip in METADATA_ADDRESSES:
        return f"cloud metadata address {ip}"
    if ip.is_unspecified or ip in _THIS_NETWORK:
        return f"unspecified address {ip}"
    if ip.is_multicast:
        return f"multicast address {ip}"
    if ip.is_link_local:
        return f"link-local address {ip}"
    if ip.is_loopback:
        return None if allow_loopback else f"loopback address {ip} ({_LOOPBACK_HINT})"
    if ip.is_reserved:
        return f"reserved address {ip}"
    if not ip.is_global:
        # RFC 1918, ULA, CGNAT (100.64/10), documentation and benchmarking ranges.
        return None if allow_private else f"private address {ip} ({_PRIVATE_HINT})"
    return None


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def _settings_refusal(address: str, settings: Settings) -> str | None:
    return address_refusal(
        address,
        allow_loopback=settings.allow_loopback_media_urls,
        allow_private=settings.allow_private_media_urls,
    )


@dataclass(frozen=True)
class Target:
    """An http(s) URL that passed the static policy (scheme, host name or literal); not yet resolved."""

    url: URL  # fragment dropped
    scheme: str
    host: str  # lower-case, no brackets, no trailing dot
    port: int

    @property
    def host_header(self) -> str:
        """``Host`` header value: the name, bracketed when IPv6, with the port only when not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def normalized(self) -> str:
        """Cache key: lower-case scheme and host, default port and fragment dropped, path '/' when empty."""
        query = f"?{self.url.raw_query_string}" if self.url.raw_query_string else ""
        return f"{self.scheme}://{self.host_header}{self.url.raw_path or '/'}{query}"


def shown_url(url: str | URL, limit: int = 200) -> str:
    """The URL for error messages: the query elided (pre-signed URLs carry credentials there), length capped."""
    parts = urllib.parse.urlsplit(str(url))
    text = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    text += "?…" if parts.query else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_url(url: str | URL, where: str, settings: Settings) -> Target:
    """The static part of the policy (no DNS): scheme, credentials, metadata names, and IP literals."""
    try:
        parsed = url if isinstance(url, URL) else URL(url)
        scheme, port = parsed.scheme.lower(), parsed.port
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{where}: {shown_url(url)} is not a valid URL ({exc})") from exc
    refuse = f"{where}: {shown_url(url)} refused by URL policy:"
    if scheme not in HTTP_SCHEMES:
        raise InvalidInput(f"{refuse} unsupported URL scheme {scheme or '(none)'!r}; only http and https")
    host = (parsed.host or "").lower().rstrip(".")
    if not host:
        raise InvalidInput(f"{refuse} no host")
    if parsed.user is not None or parsed.password is not None:
        raise InvalidInput(f"{refuse} credentials in the URL are not allowed")
    if host in METADATA_HOSTNAMES:
        raise InvalidInput(f"{refuse} {host} is a cloud metadata host")
    if (host == "localhost" or host.endswith(".localhost")) and not settings.allow_loopback_media_urls:
        raise InvalidInput(f"{refuse} {host} is a loopback name ({_LOOPBACK_HINT})")
    literal = _ip_literal(host)
    if literal is not None and (reason := _settings_refusal(literal, settings)):
        raise InvalidInput(f"{refuse} {reason}")
    return Target(url=parsed.with_fragment(None), scheme=scheme, host=host, port=port or DEFAULT_PORTS[scheme])


def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


# A small pool of our own for getaddrinfo, not the loop's default executor: a lookup that hangs past its timeout
# keeps its thread, and asyncio.run() would wait for the default executor's threads at shutdown.
_DNS_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mmt-dns")


async def _getaddrinfo(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (a module function so tests can stand in for DNS)."""
    loop = asyncio.get_running_loop()
    infos = await loop.run_in_executor(
        _DNS_POOL, lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    )
    return [str(info[4][0]) for info in infos]


async def resolve_checked(target: Target, where: str, settings: Settings) -> list[str]:
    """Resolve ``target.host`` and check every address: one refused address refuses the URL."""
    literal = _ip_literal(target.host)
    if literal is not None:
        return [literal]  # checked by check_url
    try:
        async with asyncio.timeout(settings.media_connect_timeout_s):
            addresses = list(dict.fromkeys(await _getaddrinfo(target.host, target.port)))
    except TimeoutError:
        raise InvalidInput(
            f"{where}: DNS lookup for {target.host} timed out after {settings.media_connect_timeout_s:g} s"
        ) from None
    except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise InvalidInput(f"{where}: DNS lookup for {target.host} failed ({detail})") from exc
    if not addresses:
        raise InvalidInput(f"{where}: DNS lookup for {target.host} failed (no addresses)")
    for address in addresses:
        if reason := _settings_refusal(address, settings):
            raise InvalidInput(
                f"{where}: {shown_url(target.url)} refused by URL policy: {target.host} resolves to {reason}"
            )
    return addresses


# ------------------------------------------------------------------------------------------- the client

_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = weakref.WeakKeyDictionary()
_sessions_lock = threading.Lock()


def session() -> aiohttp.ClientSession:
    """The running event loop's shared session, created on first use (a session is bound to one loop)."""
    loop = asyncio.get_running_loop()
    with _sessions_lock:
        current = _sessions.get(loop)
        if current is None or current.closed:
            current = _sessions[loop] = _new_session()
        return current


def _new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        # We only ever pass IP literals, so aiohttp's DNS cache would never be used.
        connector=aiohttp.TCPConnector(limit=64, limit_per_host=8, use_dns_cache=False),
        cookie_jar=aiohttp.DummyCookieJar(),  # one client's fetch must not carry another's cookies
        trust_env=False,  # no proxy from the environment: it would resolve names itself, defeating the pinning
        # Media is already compressed; if a server compresses anyway, aiohttp decompresses in bounded steps and
        # our cap counts the decompressed bytes.
        headers={"User-Agent": "mmtriton-media", "Accept-Encoding": "identity"},
    )


async def close() -> None:
    """Close the running loop's session (at shutdown); a later fetch on this loop opens a new one."""
    loop = asyncio.get_running_loop()
    with _sessions_lock:
        current = _sessions.pop(loop, None)
    if current is not None:
        await current.close()


@dataclass(frozen=True)
class _Redirect:
    location: str


async def fetch_http(url: str, where: str, settings: Settings) -> bytes:
    """GET an http(s) URL under the policy: the whole fetch, redirects included, within the total timeout."""
    target = check_url(url, where, settings)
    try:
        async with asyncio.timeout(settings.media_fetch_timeout_s):
            return await _follow_redirects(target, where, settings)
    except TimeoutError:
        raise InvalidInput(
            f"{where}: timed out after {settings.media_fetch_timeout_s:g} s fetching {shown_url(url)}"
        ) from None


async def _follow_redirects(target: Target, where: str, settings: Settings) -> bytes:
    # aiohttp's own redirects are off: each hop goes back through the whole policy, DNS check included.
    first = target
    for _ in range(settings.media_max_redirects + 1):
        result = await _get_once(target, where, settings)
        if isinstance(result, bytes):
            return result
        try:
            next_url = target.url.join(URL(result.location))
        except ValueError as exc:
            raise InvalidInput(f"{where}: bad redirect Location {result.location[:200]!r} ({exc})") from exc
        target = check_url(next_url, where, settings)
    raise InvalidInput(
        f"{where}: too many redirects fetching {shown_url(first.url)} (limit {settings.media_max_redirects})"
    )


async def _get_once(target: Target, where: str, settings: Settings) -> bytes | _Redirect:
    """One hop: try each checked address in order until one connects."""
    addresses = await resolve_checked(target, where, settings)
    failure: aiohttp.ClientError | None = None
    for address in addresses:
        try:
            return await _get_from(address, target, where, settings)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            failure = exc  # this address is unreachable (say, IPv6 without a route): try the next one
        except aiohttp.ClientError as exc:
            raise InvalidInput(
                f"{where}: fetching {shown_url(target.url)} failed ({type(exc).__name__}: {exc})"
            ) from exc
    assert failure is not None
    raise InvalidInput(f"{where}: {_connect_problem(failure, settings)} fetching {shown_url(target.url)}") from failure


def _connect_problem(exc: aiohttp.ClientError, settings: Settings) -> str:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"connect timed out after {settings.media_connect_timeout_s:g} s"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate error ({exc.certificate_error})"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS error ({exc})"
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, ConnectionRefusedError):
        return "connection refused"
    detail = exc.os_error.strerror if isinstance(exc, aiohttp.ClientConnectorError) else None
    return f"cannot connect ({detail or exc})"


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """Certificate- and hostname-verifying context (system CAs); a function so tests can trust their own CA."""
    return ssl.create_default_context()


async def _get_from(address: str, target: Target, where: str, settings: Settings) -> bytes | _Redirect:
    timeout = aiohttp.ClientTimeout(
        total=None, connect=settings.media_connect_timeout_s, sock_connect=settings.media_connect_timeout_s
    )
    https = target.scheme == "https"
    async with session().get(
        target.url.with_host(address),  # the checked address: no second lookup
        headers={"Host": target.host_header},
        # TLS: SNI and the certificate check use the name, not the IP we connect to.
        server_hostname=target.host if https else None,
        ssl=_tls_context() if https else True,
        allow_redirects=False,
        timeout=timeout,
    ) as response:
        if response.status in REDIRECT_STATUSES:
            location = response.headers.get("Location")
            if not location:
                raise InvalidInput(
                    f"{where}: http {response.status} without a Location header fetching {shown_url(target.url)}"
                )
            return _Redirect(location)
        if not 200 <= response.status < 300:
            raise InvalidInput(f"{where}: http {response.status} fetching {shown_url(target.url)}")
        return await _read_capped(response, target, where, settings.max_media_bytes)


async def _read_capped(response: aiohttp.ClientResponse, target: Target, where: str, limit: int) -> bytes:
    """The body, refusing as soon as it is known to exceed ``limit``: never holds more than limit + one chunk."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise InvalidInput(
            f"{where}: response too large fetching {shown_url(target.url)}: {declared} bytes, limit is {limit}"
        )
    body = bytearray()
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        body += chunk
        if len(body) > limit:
            raise InvalidInput(
                f"{where}: response too large fetching {shown_url(target.url)}: over {limit} bytes"
            )
    return bytes(body)


def fetch_http_sync(url: str, where: str, settings: Settings) -> bytes:
    """Blocking :func:`fetch_http` for synchronous callers in a thread without a running event loop.

    Each call runs its own short event loop and session (no connection reuse); async code should use
    :class:`~mmtriton.media.loader.MediaLoader`, which shares one session per loop and caches.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_fetch_and_close(url, where, settings))
    raise RuntimeError("fetch_http_sync would block a running event loop: await MediaLoader / fetch_http instead")


async def _fetch_and_close(url: str, where: str, settings: Settings) -> bytes:
    try:
        return await fetch_http(url, where, settings)
    finally:
        await close()
