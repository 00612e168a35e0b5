"""MediaItem → decoded image / waveform for async serving code: fetch by scheme, decode off the event loop, cache.

Decoded media are cached in one byte-bounded LRU: http(s) by normalised URL (a hit skips the fetch too), data:
URIs and files by the sha256 of their bytes (a hit skips the decode); audio keys also carry the target rate.
Cached values are shared between requests: treat them as read-only.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from mmtriton.media.audio import audio_cache_key, decode_audio
from mmtriton.media.cache import ByteLRU
from mmtriton.media.fetch import read_media_bytes, url_scheme
from mmtriton.media.http import HTTP_SCHEMES, check_url, close, fetch_http
from mmtriton.media.image import decode_image
from mmtriton.protocol import MediaItem
from mmtriton.settings import Settings


def media_nbytes(value: Any) -> int:
    """Cache cost of a decoded item: an RGB image's pixels, a waveform's samples."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    width, height = value.size
    return width * height * 3


class MediaLoader:
    """One per model instance; safe to share between requests and event loops (sessions are per loop)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.cache: ByteLRU[str, Any] = ByteLRU(settings.media_cache_bytes, media_nbytes)

    async def load_image(self, item: MediaItem) -> Image.Image:
        return await self._load(item, "image", lambda key: key,
                                lambda data: decode_image(data, item.where, self.settings.max_image_pixels))

    async def load_audio(self, item: MediaItem, sample_rate: int, min_seconds: float = 0.0) -> np.ndarray:
        """Mono float32 at ``sample_rate``; refused (naming the item) past MMT_MAX_AUDIO_SECONDS or under
        ``min_seconds``, before the cost where the container's header tells."""
        return await self._load(
            item, "audio", lambda key: audio_cache_key(key, sample_rate),
            lambda data: decode_audio(data, item.where, sample_rate, self.settings.max_audio_seconds, min_seconds),
        )

    async def _load(self, item: MediaItem, kind: str, cache_key: Callable[[str], str],
                    decode: Callable[[bytes], Any]) -> Any:
        if url_scheme(item.url) in HTTP_SCHEMES:
            # The static policy runs before the cache, so a URL refused now is refused even if cached before.
            key = cache_key("url:" + check_url(item.url, item.where, self.settings).normalized)
            if (cached := self.cache.get(key)) is not None:
                return cached
            data = await fetch_http(item.url, item.where, self.settings)
        else:
            data, source = await asyncio.to_thread(self._local_bytes_and_key, item, kind)
            key = cache_key(source)
            if (cached := self.cache.get(key)) is not None:
                return cached
        value = await asyncio.to_thread(decode, data)
        self.cache.put(key, value)
        return value

    def stats(self) -> dict[str, int]:
        """Decoded-media cache counters: hits, misses, evictions, bytes, items."""
        return self.cache.stats()

    async def close(self) -> None:
        """Close the running loop's shared HTTP session (at shutdown)."""
        await close()

    def _local_bytes_and_key(self, item: MediaItem, kind: str) -> tuple[bytes, str]:
        # Reading (base64 decode, file I/O) and hashing are both O(size): keep them off the event loop together.
        data = read_media_bytes(item.url, item.where, kind, self.settings)
        return data, "sha256:" + hashlib.sha256(data).hexdigest()
