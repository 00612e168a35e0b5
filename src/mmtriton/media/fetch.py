"""Media URL → bytes: ``data:`` URIs, ``file://`` under allow-listed directories, and (blocking) http(s).

http(s) lives in :mod:`mmtriton.media.http` (URL policy, shared client); async code should use
:class:`mmtriton.media.loader.MediaLoader`, which also caches decoded images.
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.parse
from pathlib import Path

from mmtriton.protocol import InvalidInput
from mmtriton.settings import Settings


def read_data_uri(url: str, where: str, kind: str, max_bytes: int) -> bytes:
    """``data:<kind>/<subtype>;base64,<payload>`` → bytes."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise InvalidInput(f"{where}: data URI has no ',' separating header and payload")
    mime = header[5:].split(";")[0].strip().lower()
    if not mime.startswith(f"{kind}/"):
        raise InvalidInput(f"{where}: data URI type {mime or '(none)'!r} is not {kind}/*")
    if ";base64" not in header.lower():
        raise InvalidInput(f"{where}: data URI must be base64-encoded")
    # base64 is 4/3 the size: refuse before decoding a payload we would refuse after.
    if len(payload) * 3 // 4 > max_bytes:
        raise InvalidInput(f"{where}: data is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{where}: data URI payload is not valid base64") from exc


def read_local_file(url: str, where: str, settings: Settings) -> bytes:
    """``file:///abs/path`` → bytes, only under ``settings.allowed_local_media_dirs`` (none by default)."""
    if not settings.allowed_local_media_dirs:
        raise InvalidInput(
            f"{where}: file:// URLs are disabled (set MMT_ALLOWED_LOCAL_MEDIA_DIRS to allow a directory)"
        )
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise InvalidInput(f"{where}: file:// URL must not name a host")
    path = Path(urllib.parse.unquote(parsed.path))
    if not path.is_absolute():
        raise InvalidInput(f"{where}: file:// path must be absolute")
    # Resolve symlinks and '..' first, so a link out of an allowed directory is refused.
    real = Path(os.path.realpath(path))
    allowed = [Path(os.path.realpath(d)) for d in settings.allowed_local_media_dirs]
    if not any(real == d or d in real.parents for d in allowed):
        raise InvalidInput(f"{where}: {path} is not under an allowed media directory")
    if not real.is_file():
        raise InvalidInput(f"{where}: {path} does not exist or is not a file")
    size = real.stat().st_size
    if size > settings.max_media_bytes:
        raise InvalidInput(f"{where}: file is {size} bytes, limit is {settings.max_media_bytes}")
    return real.read_bytes()


def url_scheme(url: str) -> str:
    """Lower-case scheme, or "" when there is none."""
    return url.split(":", 1)[0].strip().lower() if ":" in url else ""


def read_media_bytes(url: str, where: str, kind: str, settings: Settings) -> bytes:
    """Blocking: call it from a worker thread, never on an event loop."""
    scheme = url_scheme(url)
    if scheme == "data":
        return read_data_uri(url, where, kind, settings.max_media_bytes)
    if scheme == "file":
        return read_local_file(url, where, settings)
    if scheme in ("http", "https"):
        # Routed to a blocking wrapper (same policy, limits and errors) rather than refused, so synchronous
        # callers such as the aggregated pipeline, which runs this in a worker thread, keep working. It opens a
        # short-lived loop and session per call: no connection reuse and no cache, which MediaLoader provides.
        from mmtriton.media.http import fetch_http_sync  # aiohttp is only imported when http(s) is used

        return fetch_http_sync(url, where, settings)
    raise InvalidInput(f"{where}: unsupported URL scheme {scheme or '(none)'!r}; use data:, file:// or http(s)")
