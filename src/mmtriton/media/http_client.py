"""The http(s) media client: DNS pinning, redirects re-checked hop by hop, a size cap, one session per event loop.

DNS pinning: we resolve the host name ourselves (in a worker thread, with a timeout), check *every* address it
resolves to (:func:`~mmtriton.media.url_policy.check_resolved`), then connect to a checked address by IP literal,
sending the real name in the ``Host`` header and, for https, as the TLS server name (SNI and certificate check
still use the name). aiohttp therefore never looks the name up itself, so a rebinding DNS server gets no second
lookup to answer differently. aiohttp keys its connection pool by (IP, port, TLS server name), so a reused
connection always goes to an address that this very request has just checked. No proxy is ever used
(``trust_env=False``): a proxy would resolve the name itself.

Errors name the item (``where``) and the URL. What may succeed on a retry (an upstream 5xx or 429, a timeout, a
refused or dropped connection, a temporary DNS failure) raises :class:`~mmtriton.media.errors.MediaUnavailable`;
everything else (4xx, policy refusals, bad redirects, TLS failures, too large) raises
:class:`~mmtriton.protocol.InvalidInput`.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp
from yarl import URL

from mmtriton.media.errors import MediaUnavailable
from mmtriton.media.policy import MediaPolicy
from mmtriton.media.url_policy import Target, check_resolved, check_url, shown_url
from mmtriton.protocol import InvalidInput

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 64 * 1024


def is_transient_status(status: int) -> bool:
    """Upstream statuses worth a retry later: server errors and rate limiting."""
    return status >= 500 or status == 429


# ------------------------------------------------------------------------------------------------- DNS

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


async def resolve_checked(target: Target, where: str, policy: MediaPolicy) -> list[str]:
    """Resolve ``target.host`` and check every address: one refused address refuses the URL."""
    literal = target.ip_literal
    if literal is not None:
        return [literal]  # checked by check_url
    try:
        async with asyncio.timeout(policy.connect_timeout_s):
            addresses = list(dict.fromkeys(await _getaddrinfo(target.host, target.port)))
    except TimeoutError:
        raise MediaUnavailable(
            f"{where}: DNS lookup for {target.host} timed out after {policy.connect_timeout_s:g} s"
        ) from None
    except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        # EAI_AGAIN: the resolver could not answer now (a name that does not exist is the client's problem).
        error = MediaUnavailable if getattr(exc, "errno", None) == socket.EAI_AGAIN else InvalidInput
        raise error(f"{where}: DNS lookup for {target.host} failed ({detail})") from exc
    if not addresses:
        raise InvalidInput(f"{where}: DNS lookup for {target.host} failed (no addresses)")
    check_resolved(target, addresses, where, policy)
    return addresses


# ---------------------------------------------------------------------------------------------- session

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


# -------------------------------------------------------------------------------------------- fetching


@dataclass(frozen=True)
class _Redirect:
    location: str


async def fetch_http(url: str, where: str, policy: MediaPolicy) -> bytes:
    """GET an http(s) URL under the policy: the whole fetch, redirects included, within the total timeout."""
    target = check_url(url, where, policy)
    try:
        async with asyncio.timeout(policy.fetch_timeout_s):
            return await _follow_redirects(target, where, policy)
    except TimeoutError:
        raise MediaUnavailable(
            f"{where}: timed out after {policy.fetch_timeout_s:g} s fetching {shown_url(url)}"
        ) from None


async def _follow_redirects(target: Target, where: str, policy: MediaPolicy) -> bytes:
    # aiohttp's own redirects are off: each hop goes back through the whole policy, DNS check included.
    first = target
    for _ in range(policy.max_redirects + 1):
        result = await _get_once(target, where, policy)
        if isinstance(result, bytes):
            return result
        try:
            next_url = target.url.join(URL(result.location))
        except ValueError as exc:
            raise InvalidInput(f"{where}: bad redirect Location {result.location[:200]!r} ({exc})") from exc
        target = check_url(next_url, where, policy)
    raise InvalidInput(
        f"{where}: too many redirects fetching {shown_url(first.url)} (limit {policy.max_redirects})"
    )


async def _get_once(target: Target, where: str, policy: MediaPolicy) -> bytes | _Redirect:
    """One hop: try each checked address in order until one connects."""
    addresses = await resolve_checked(target, where, policy)
    failure: aiohttp.ClientError | None = None
    for address in addresses:
        try:
            return await _get_from(address, target, where, policy)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            failure = exc  # this address is unreachable (say, IPv6 without a route): try the next one
        except aiohttp.ClientError as exc:
            # Dropped mid-response (disconnected, reset, truncated body): the next try may well succeed.
            transient = isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError)
            raise (MediaUnavailable if transient else InvalidInput)(
                f"{where}: fetching {shown_url(target.url)} failed ({type(exc).__name__}: {exc})"
            ) from exc
    assert failure is not None
    problem, transient = _connect_problem(failure, policy)
    raise (MediaUnavailable if transient else InvalidInput)(
        f"{where}: {problem} fetching {shown_url(target.url)}"
    ) from failure


def _connect_problem(exc: aiohttp.ClientError, policy: MediaPolicy) -> tuple[str, bool]:
    """(what went wrong, whether a retry may succeed): a bad certificate stays bad, a refused port may open."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"connect timed out after {policy.connect_timeout_s:g} s", True
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate error ({exc.certificate_error})", False
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS error ({exc})", False
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, ConnectionRefusedError):
        return "connection refused", True
    detail = exc.os_error.strerror if isinstance(exc, aiohttp.ClientConnectorError) else None
    return f"cannot connect ({detail or exc})", True


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """Certificate- and hostname-verifying context (system CAs); a function so tests can trust their own CA."""
    return ssl.create_default_context()


async def _get_from(address: str, target: Target, where: str, policy: MediaPolicy) -> bytes | _Redirect:
    timeout = aiohttp.ClientTimeout(
        total=None, connect=policy.connect_timeout_s, sock_connect=policy.connect_timeout_s
    )
    https = target.scheme == "https"  # the protocol of this connection, not a choice of transport
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
            error = MediaUnavailable if is_transient_status(response.status) else InvalidInput
            raise error(f"{where}: http {response.status} fetching {shown_url(target.url)}")
        return await _read_capped(response, target, where, policy.max_bytes)


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
