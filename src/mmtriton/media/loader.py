"""MediaItem → decoded image / waveform for async serving code: fetch by scheme, decode off the event loop, cache.

Decoded images are cached in a byte-bounded LRU: http(s) by normalised URL (a hit skips the fetch too), data:
URIs and files by the sha256 of their bytes (a hit skips the decode). Cached images are shared between requests:
treat them as read-only.
"""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
from PIL import Image

from mmtriton.media.audio import decode_audio
from mmtriton.media.cache import ByteLRU
from mmtriton.media.fetch import read_media_bytes, url_scheme
from mmtriton.media.http import HTTP_SCHEMES, check_url, close, fetch_http
from mmtriton.media.image import decode_image
from mmtriton.protocol import MediaItem
from mmtriton.settings import Settings


def image_nbytes(image: Image.Image) -> int:
    """Cache cost of a decoded RGB image."""
    width, height = image.size
    return width * height * 3


class MediaLoader:
    """One per model instance; safe to share between requests and event loops (sessions are per loop)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.images: ByteLRU[str, Image.Image] = ByteLRU(settings.media_cache_bytes, image_nbytes)

    async def load_image(self, item: MediaItem) -> Image.Image:
        if url_scheme(item.url) in HTTP_SCHEMES:
            # The static policy runs before the cache, so a URL refused now is refused even if cached before.
            key = "url:" + check_url(item.url, item.where, self.settings).normalized
            if (cached := self.images.get(key)) is not None:
                return cached
            data = await fetch_http(item.url, item.where, self.settings)
        else:
            data, key = await asyncio.to_thread(self._local_bytes_and_key, item)
            if (cached := self.images.get(key)) is not None:
                return cached
        image = await asyncio.to_thread(decode_image, data, item.where, self.settings.max_image_pixels)
        self.images.put(key, image)
        return image

    async def load_audio(self, item: MediaItem, sample_rate: int) -> np.ndarray:
        """Mono float32 at ``sample_rate`` (not cached)."""
        data = await self.read_bytes(item, "audio")
        return await asyncio.to_thread(decode_audio, data, item.where, sample_rate, self.settings.max_audio_seconds)

    async def read_bytes(self, item: MediaItem, kind: str) -> bytes:
        """Raw bytes of any supported URL; ``kind`` is the data: URI type expected (image, audio, video)."""
        if url_scheme(item.url) in HTTP_SCHEMES:
            return await fetch_http(item.url, item.where, self.settings)
        return await asyncio.to_thread(read_media_bytes, item.url, item.where, kind, self.settings)

    def stats(self) -> dict[str, int]:
        """Image cache counters: hits, misses, evictions, bytes, items."""
        return self.images.stats()

    async def close(self) -> None:
        """Close the running loop's shared HTTP session (at shutdown)."""
        await close()

    def _local_bytes_and_key(self, item: MediaItem) -> tuple[bytes, str]:
        # Reading (base64 decode, file I/O) and hashing are both O(size): keep them off the event loop together.
        data = read_media_bytes(item.url, item.where, "image", self.settings)
        return data, "sha256:" + hashlib.sha256(data).hexdigest()
