"""Compatibility names for ``bench/fuzz.py``, which imports them from here: new code uses
:mod:`mmtriton.media.transport` (and :class:`~mmtriton.media.loader.MediaLoader` for anything remote)."""

from __future__ import annotations

from mmtriton.media.policy import MediaPolicy, as_policy
from mmtriton.media.transport import read_data_uri, read_local_bytes, url_scheme
from mmtriton.settings import Settings

__all__ = ["read_data_uri", "read_media_bytes", "url_scheme"]


def read_media_bytes(url: str, where: str, kind: str, policy: MediaPolicy | Settings) -> bytes:
    """Blocking read of a ``data:`` / ``file://`` URL (:func:`~mmtriton.media.transport.read_local_bytes`)."""
    return read_local_bytes(url, where, kind, as_policy(policy))
