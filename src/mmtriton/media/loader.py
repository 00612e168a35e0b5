"""MediaItem → decoded value for async serving code, along two axes: transport by URL scheme
(:mod:`mmtriton.media.transport`) × decoding by modality (:class:`~mmtriton.media.decoder.MediaDecoder`).

Decoded media are cached in one byte-bounded LRU: http(s) by normalised URL (a hit skips the fetch too), data:
URIs by the sha256 of the URI (a hit skips the base64 decode too), files by the sha256 of their bytes (a hit skips
the decode); each decoder adds what tells its outputs
apart (audio: the target rate). Concurrent loads of one key fetch and decode once (single-flight). Cached values
are shared between requests: treat them as read-only.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from mmtriton.media import http_client
from mmtriton.media.audio import AudioDecoder
from mmtriton.media.cache import ByteLRU
from mmtriton.media.decoder import MediaDecoder
from mmtriton.media.image import ImageDecoder
from mmtriton.media.policy import MediaPolicy
from mmtriton.media.single_flight import SingleFlight
from mmtriton.media.transport import Fetched, transport_for
from mmtriton.media.video import SampledVideo, VideoDecoder, VideoLimits, VideoOptions
from mmtriton.protocol import MediaItem
from mmtriton.settings import Settings

T = TypeVar("T")
# Longer URLs are keyed off the event loop: a data: URI's key is the sha256 of all of it (~1 ms per MB here).
KEY_OFF_LOOP_CHARS = 64 * 1024


class MediaLoader:
    """One per model instance; safe to share between requests and event loops (sessions are per loop)."""

    def __init__(self, settings: Settings):
        self.policy = MediaPolicy.from_settings(settings)
        self.cache: ByteLRU[str, Any] = ByteLRU(settings.media_cache_bytes)
        self._single_flight: SingleFlight[Any] = SingleFlight()
        self.video_limits = VideoLimits.from_settings(settings)

    async def load_image(self, item: MediaItem) -> Image.Image:
        return await self.load(item, ImageDecoder(self.policy.max_image_pixels))

    async def load_audio(self, item: MediaItem, sample_rate: int, min_seconds: float = 0.0) -> np.ndarray:
        """Mono float32 at ``sample_rate``; refused (naming the item) past MMT_MAX_AUDIO_SECONDS or under
        ``min_seconds``, before the cost where the container's header tells."""
        return await self.load(item, AudioDecoder(sample_rate, self.policy.max_audio_seconds, min_seconds))

    async def load_video(self, item: MediaItem, options: VideoOptions | None = None) -> SampledVideo:
        """The frames sampled by ``options`` (else MMT_VIDEO_FPS / MMT_VIDEO_NUM_FRAMES), within the MMT_*VIDEO*
        limits; refused (naming the item) before the cost where the header tells. Cached per bytes × sampling."""
        return await self.load(item, VideoDecoder.for_request(self.video_limits, options, item.where))

    async def load(self, item: MediaItem, decoder: MediaDecoder[T]) -> T:
        """``item``'s bytes by its URL's transport, decoded by ``decoder``, through the cache."""
        transport = transport_for(item.url, item.where)
        if len(item.url) > KEY_OFF_LOOP_CHARS:  # a URL that carries its bytes (data:) is hashed for its key
            source_key = await asyncio.to_thread(transport.key_before_fetch, item.url, item.where, self.policy)
        else:
            source_key = transport.key_before_fetch(item.url, item.where, self.policy)
        fetched: Fetched | None = None
        if source_key is None:  # the bytes name themselves: read them first
            fetched = await transport.fetch(item.url, item.where, decoder.kind, self.policy)
            if fetched.source_key is None:
                raise RuntimeError(f"{item.where}: the {type(transport).__name__} named neither the URL nor the bytes")
            source_key = fetched.source_key
        key = decoder.cache_key(source_key)
        if (cached := self.cache.get(key)) is not None:
            return cached

        async def fetch_decode_publish() -> T:
            if key in self.cache:  # published between our miss and now (membership leaves the counters alone)
                hit = self.cache.get(key)
                if hit is not None:
                    return hit
            data = fetched.data if fetched is not None else (
                await transport.fetch(item.url, item.where, decoder.kind, self.policy)
            ).data
            value = await asyncio.to_thread(decoder.decode, data, item.where)
            self.cache.put(key, value, size=decoder.nbytes(value))
            return value

        return await self._single_flight.run(key, item.where, fetch_decode_publish)

    def stats(self) -> dict[str, int]:
        """Decoded-media cache counters: hits, misses, evictions, bytes, items."""
        return self.cache.stats()

    async def close(self) -> None:
        """Close the running loop's shared HTTP session (at shutdown)."""
        await http_client.close()
