"""Transport by URL scheme: the one place a media URL's scheme picks how its bytes arrive.

Each transport gives the bytes and the *source key* that names them for the cache: ``"url:<normalised URL>"``
for http(s), known before fetching (so a cache hit skips the fetch); ``"data-sha256:<hex>"`` of the whole URI for
``data:``, also known before (a hit skips the base64 decode, the costly part: ~11 ms for a 1024² PNG here,
against ~3.6 ms to hash the URI); and ``"sha256:<hex>"`` of the bytes for ``file://``, known only after reading
them (a hit then skips the image decode). So one picture sent as a data: URI and as a file is two entries of the
decoded-media cache (the embedding cache, keyed by the decoded content, still has one). Adding a scheme is one
:func:`register_transport` call.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mmtriton.media import http_client
from mmtriton.media.policy import MediaPolicy
from mmtriton.media.url_policy import check_url
from mmtriton.protocol import InvalidInput


@dataclass(frozen=True)
class Fetched:
    data: bytes
    # "url:<normalised>", "data-sha256:<hex>" or "sha256:<hex>"; None from a transport whose key_before_fetch
    # gave it already (not computed twice: for a data: URI that is a hash of all of it).
    source_key: str | None


class Transport(Protocol):
    def key_before_fetch(self, url: str, where: str, policy: MediaPolicy) -> str | None:
        """The source key when the URL alone names the bytes, else None (the bytes name themselves).

        Runs every static check that does not need the bytes, so a URL refused now is refused even if cached
        before."""
        ...

    async def fetch(self, url: str, where: str, kind: str, policy: MediaPolicy) -> Fetched:
        """The bytes (``kind`` = "image" / "audio" / …: what a ``data:`` URI's MIME type must be) and their key."""
        ...


# ------------------------------------------------------------------------------------- data: and file://


def read_data_uri(url: str, where: str, kind: str, max_bytes: int) -> bytes:
    """``data:<kind>/<subtype>;base64,<payload>`` → bytes."""
    check_data_uri_shape(url, where, max_bytes)
    header, _, payload = url.partition(",")
    mime = header[5:].split(";")[0].strip().lower()
    if not mime.startswith(f"{kind}/"):
        raise InvalidInput(f"{where}: data URI type {mime or '(none)'!r} is not {kind}/*")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{where}: data URI payload is not valid base64") from exc


def read_local_file(url: str, where: str, kind: str, policy: MediaPolicy) -> bytes:
    """``file:///abs/path`` → bytes, only under ``policy.allowed_local_dirs`` (none by default); any ``kind``."""
    if not policy.allowed_local_dirs:
        raise InvalidInput(
            f"{where}: file:// URLs are disabled (set MMT_ALLOWED_LOCAL_MEDIA_DIRS to allow a directory)"
        )
    try:
        parsed = urllib.parse.urlparse(url)
    except ValueError as exc:  # e.g. "Invalid IPv6 URL" for file://[x
        raise InvalidInput(f"{where}: file:// URL is not valid ({exc})") from exc
    if parsed.netloc not in ("", "localhost"):
        raise InvalidInput(f"{where}: file:// URL must not name a host")
    path = Path(urllib.parse.unquote(parsed.path))
    if not path.is_absolute():
        raise InvalidInput(f"{where}: file:// path must be absolute")
    if "\0" in str(path):
        raise InvalidInput(f"{where}: file:// path contains a NUL byte")
    try:
        os.fsencode(path)
    except UnicodeError as exc:  # a lone surrogate (JSON "\udd2c"): no file can have that name (bench/fuzz.py)
        raise InvalidInput(f"{where}: file:// path is not valid UTF-8") from exc
    # Resolve symlinks and '..' first, so a link out of an allowed directory is refused.
    real = Path(os.path.realpath(path))
    allowed = [Path(os.path.realpath(d)) for d in policy.allowed_local_dirs]
    if not any(real == d or d in real.parents for d in allowed):
        raise InvalidInput(f"{where}: {path} is not under an allowed media directory")
    try:
        if not real.is_file():
            raise InvalidInput(f"{where}: {path} does not exist or is not a file")
        size = real.stat().st_size
        if size > policy.max_bytes:
            raise InvalidInput(f"{where}: file is {size} bytes, limit is {policy.max_bytes}")
        return real.read_bytes()
    except OSError as exc:  # a name too long, a file that vanished or may not be read
        raise InvalidInput(f"{where}: {path} cannot be read ({exc.strerror or exc})") from exc


LocalReader = Callable[[str, str, str, MediaPolicy], bytes]  # (url, where, kind, policy) → bytes; blocking


@dataclass(frozen=True)
class LocalTransport:
    """Bytes at hand (in the URL, on disk): read and hashed together in a worker thread, both O(size)."""

    read: LocalReader

    def key_before_fetch(self, url: str, where: str, policy: MediaPolicy) -> str | None:
        return None

    async def fetch(self, url: str, where: str, kind: str, policy: MediaPolicy) -> Fetched:
        return await asyncio.to_thread(self._read_and_hash, url, where, kind, policy)

    def _read_and_hash(self, url: str, where: str, kind: str, policy: MediaPolicy) -> Fetched:
        data = self.read(url, where, kind, policy)
        return Fetched(data, "sha256:" + hashlib.sha256(data).hexdigest())


def check_data_uri_shape(url: str, where: str, max_bytes: int) -> None:
    """The checks of :func:`read_data_uri` that need neither the bytes nor the media kind."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise InvalidInput(f"{where}: data URI has no ',' separating header and payload")
    if ";base64" not in header.lower():
        raise InvalidInput(f"{where}: data URI must be base64-encoded")
    # base64 is 4/3 the size: refuse before decoding a payload we would refuse after.
    if len(payload) * 3 // 4 > max_bytes:
        raise InvalidInput(f"{where}: data is larger than {max_bytes} bytes")


@dataclass(frozen=True)
class DataUriTransport:
    """``data:`` URIs: keyed by the URI itself before the base64 decode. A hit means this exact URI (media type
    included) was decoded before under the same decoder's key, so passed its checks then; the shape checks run
    again on every request."""

    def key_before_fetch(self, url: str, where: str, policy: MediaPolicy) -> str | None:
        check_data_uri_shape(url, where, policy.max_bytes)
        return data_uri_key(url)

    async def fetch(self, url: str, where: str, kind: str, policy: MediaPolicy) -> Fetched:
        return Fetched(await asyncio.to_thread(self.read, url, where, kind, policy), None)

    @staticmethod
    def read(url: str, where: str, kind: str, policy: MediaPolicy) -> bytes:
        return read_data_uri(url, where, kind, policy.max_bytes)


def data_uri_key(url: str) -> str:
    return "data-sha256:" + hashlib.sha256(url.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ http(s)


class HttpTransport:
    """http(s) under the URL policy (:mod:`mmtriton.media.url_policy`) via the shared client."""

    def key_before_fetch(self, url: str, where: str, policy: MediaPolicy) -> str | None:
        return "url:" + check_url(url, where, policy).normalized

    async def fetch(self, url: str, where: str, kind: str, policy: MediaPolicy) -> Fetched:
        key = self.key_before_fetch(url, where, policy)
        assert key is not None
        return Fetched(await http_client.fetch_http(url, where, policy), key)


# ----------------------------------------------------------------------------------------------- registry

_HTTP = HttpTransport()
_TRANSPORTS: dict[str, Transport] = {
    "data": DataUriTransport(),
    "file": LocalTransport(read_local_file),
    "http": _HTTP,
    "https": _HTTP,
}


def register_transport(scheme: str, transport: Transport) -> None:
    """Serve URLs of ``scheme`` (lower-case, no ':') with ``transport``; replaces any transport it had."""
    _TRANSPORTS[scheme.lower()] = transport


def url_scheme(url: str) -> str:
    """Lower-case scheme, or "" when there is none."""
    return url.split(":", 1)[0].strip().lower() if ":" in url else ""


def transport_for(url: str, where: str) -> Transport:
    """The transport for ``url``'s scheme; refuses one without."""
    scheme = url_scheme(url)
    transport = _TRANSPORTS.get(scheme)
    if transport is None:
        raise InvalidInput(
            f"{where}: unsupported URL scheme {scheme or '(none)'!r}; use data:, file:// or http(s)"
        )
    return transport


def read_local_bytes(url: str, where: str, kind: str, policy: MediaPolicy) -> bytes:
    """Blocking read of a URL whose bytes are at hand (``data:``, ``file://``), for code without an event loop.

    Remote schemes are refused with a RuntimeError (a caller's mistake, not the client's): fetch those with
    :class:`~mmtriton.media.loader.MediaLoader`, which shares a session per loop and caches.
    """
    transport = transport_for(url, where)
    if not isinstance(transport, LocalTransport | DataUriTransport):
        raise RuntimeError(f"{where}: {url_scheme(url)} media is fetched asynchronously: use MediaLoader")
    return transport.read(url, where, kind, policy)
