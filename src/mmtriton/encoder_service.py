"""The encoder stage as plain Python: media items → tower → embeddings in this process's NIXL pool → descriptors.

One :class:`EncoderService` per encoder model (``encoder_image``, ``encoder_audio``); what differs by modality is
the :class:`MediaEncoder` it holds (how an item is loaded and checked, and the tower). One tower may serve several
media kinds (:data:`SERVED_KINDS`: Qwen2-VL's vision tower encodes images and videos, so ``encoder_image`` takes
both). A checkpoint whose family does not take that modality gets no encoder: the service then answers requests
with nothing to encode and refuses items by name, so one model repository serves every family.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from mmtriton.embedding_cache import EmbeddingCache
from mmtriton.families import family_for
from mmtriton.media.loader import MediaLoader
from mmtriton.metrics import StageTimes
from mmtriton.protocol import InvalidInput, MediaItem
from mmtriton.settings import Settings
from mmtriton.transfer import EmbeddingDescriptor, EmbeddingSender
from mmtriton.wire import MediaPlacement

if TYPE_CHECKING:
    from mmtriton.protocol import VideoOptions

MiB = 1024 * 1024

# Encoder model (encoder_<name>) → the media kinds its tower encodes, in the order the model's inputs list them.
SERVED_KINDS: dict[str, tuple[str, ...]] = {"image": ("image", "video"), "audio": ("audio",)}


@dataclass
class EncodedMedia:
    embeddings: torch.Tensor  # [num_tokens, hidden]: what replaces the item's placeholder tokens
    # Qwen2-VL images/videos: the [t, h, w] patch grid. None for audio.
    grid_thw: tuple[int, int, int] | None = None


class MediaEncoder(Protocol):
    """One encoder model's tower (mmtriton.encoder for images and videos, mmtriton.audio_encoder for audio)."""

    kind: str  # the encoder model it backs (encoder_<kind>)
    kinds: tuple[str, ...]  # the media kinds it encodes

    async def load(self, media: MediaLoader, item: MediaItem, video: VideoOptions | None = None) -> Any:
        """The item, fetched, decoded (videos: frames sampled by ``video``, else the settings' defaults) and
        checked for this model (raises InvalidInput naming the item)."""

    def encode_many(self, loaded: list[Any]) -> list[EncodedMedia]:
        """Loaded items (from one or several requests) → one EncodedMedia each, in one forward pass."""


def media_encoder_for(kind: str, model_path: str, dtype: torch.dtype) -> MediaEncoder | None:
    """The checkpoint's encoder for ``kind``, or None when its family takes no precomputed ``kind`` embeddings."""
    family = family_for(model_path)
    if kind not in family.embeds:
        return None
    if kind == "image":
        from mmtriton.encoder import image_encoder_for

        return image_encoder_for(model_path, dtype)
    if kind == "audio":
        return AudioMediaEncoder(model_path, dtype)
    raise ValueError(f"no {kind} encoder for model family {family.name}")


class AudioMediaEncoder:
    """Qwen2-Audio's tower as a MediaEncoder: clips decoded at the feature extractor's own rate, refused by name
    when too short for the model, encoded in one pass."""

    kind = "audio"
    kinds = ("audio",)

    def __init__(self, model_path: str, dtype: torch.dtype):
        from mmtriton.audio_encoder import Qwen2AudioEncoder

        self.tower = Qwen2AudioEncoder(model_path, dtype)

    async def load(self, media: MediaLoader, item: MediaItem, video: VideoOptions | None = None) -> Any:
        wave = await media.load_audio(item, self.tower.sample_rate)
        self.tower.check_length(wave, item.where)
        return wave

    def encode_many(self, loaded: list[Any]) -> list[EncodedMedia]:
        return [EncodedMedia(e.embeddings) for e in self.tower.encode(loaded)]


class EncoderService:
    """Items of the kinds one encoder serves → embeddings in this process's NIXL pool → one descriptor (JSON) per
    item, whose placement says the item's own kind (an image or a video, for encoder_image)."""

    def __init__(self, kind: str, settings: Settings, encoder: MediaEncoder | None, agent_name: str | None = None):
        self.kind = kind
        self.settings = settings
        self.encoder = encoder
        self.family = family_for(settings.model_path())
        # What this service encodes: its tower's kinds that the family takes as embeddings.
        served = encoder.kinds if encoder is not None else SERVED_KINDS.get(kind, (kind,))
        self.kinds = tuple(k for k in served if k in self.family.embeds) if encoder is not None else served
        self.media = MediaLoader(settings)
        # Embeddings of recent items by content × this encoder (its checkpoint and dtype): a hit skips the tower.
        self.embedding_cache = EmbeddingCache(
            settings.embedding_cache_mib * MiB if encoder is not None else 0,
            scope=f"encoder_{kind}:{settings.model_path()}:{settings.dtype}",
        )
        self.times = StageTimes()
        # Forward passes, the requests they served, and the most requests one pass served (a gauge).
        self.batching = {"batches": 0, "requests": 0, "max_requests": 0}
        self.sender = EmbeddingSender(
            agent_name or f"encoder_{kind}-{os.getpid()}", settings.embedding_pool_mib * MiB,
            ack_timeout_s=settings.embedding_ack_timeout_s,
        ) if encoder is not None else None

    @property
    def tower_name(self) -> str:
        return type(self.encoder).__name__ if self.encoder is not None else f"none ({self.family.name})"

    async def _load(self, item: MediaItem, video: VideoOptions | None) -> Any:
        if self.encoder is None:
            raise InvalidInput(f"{item.where}: model {self.settings.model_path()} ({self.family.name}) does not take "
                               f"{item.kind} input (it takes: {', '.join(self.family.modalities) or 'text only'})")
        if item.kind not in self.kinds:
            raise InvalidInput(f"{item.where}: a {item.kind} item sent to the {self.kind} encoder (it encodes: "
                               f"{', '.join(self.kinds)})")
        return await self.encoder.load(self.media, item, video)

    async def encode_batch(self, requests: list[list[MediaItem]],
                           video_options: list[VideoOptions | None] | None = None) -> list[list[str] | BaseException]:
        """Several requests' items (Triton's dynamic batch) through the tower in one forward pass; request i's
        videos are sampled by ``video_options[i]`` (None: the settings' defaults). A request whose item fails to
        load gets its error; the others go on."""
        options = video_options if video_options is not None else [None] * len(requests)
        with self.times.time(f"{self.kind}_load"):
            loaded = await asyncio.gather(
                *(asyncio.gather(*(self._load(item, video) for item in items))
                  for items, video in zip(requests, options, strict=True)),
                return_exceptions=True,
            )
        values = [value for batch in loaded if not isinstance(batch, BaseException) for value in batch]
        if not values:
            return [batch if isinstance(batch, BaseException) else [] for batch in loaded]
        kinds = [item.kind for items, batch in zip(requests, loaded, strict=True)
                 if not isinstance(batch, BaseException) for item in items]
        # Hashing the decoded items reads all their bytes: off the event loop, as the tower is.
        with self.times.time("embedding_lookup"):
            plan = await asyncio.to_thread(self.embedding_cache.plan, kinds, values)
        fresh: list[EncodedMedia] = []
        if plan.to_encode:  # else every item was cached: no forward pass
            self.batching["batches"] += 1
            self.batching["requests"] += len(requests)
            self.batching["max_requests"] = max(self.batching["max_requests"], len(requests))
            with self.times.time("encode"):
                fresh = await asyncio.to_thread(self.encoder.encode_many, plan.to_encode)
        encoded = iter(plan.complete(fresh))
        results: list[list[str] | BaseException] = []
        with self.times.time("embedding_put"):
            for items, batch in zip(requests, loaded, strict=True):
                if isinstance(batch, BaseException):
                    results.append(batch)
                    continue
                mine = [next(encoded) for _ in batch]
                put: list[str] = []
                try:
                    for item, e in zip(items, mine, strict=True):
                        put.append(self._put(item.kind, e))
                    results.append(put)
                except Exception as exc:  # noqa: BLE001 - e.g. a full pool: this request's error only
                    for raw in put:  # its earlier items will never be read: free them now, not at expiry
                        self.sender.withdraw(EmbeddingDescriptor.from_json(raw).transfer_id)
                    results.append(exc)
        return results

    def _put(self, kind: str, encoded: EncodedMedia) -> str:
        placement = MediaPlacement(kind=kind, grid_thw=encoded.grid_thw)
        return self.sender.put(encoded.embeddings, placement.model_dump(exclude_none=True)).to_json()

    def pool_stats(self) -> dict[str, float]:
        from dataclasses import asdict

        if self.sender is None:
            return {}
        return {**asdict(self.sender.occupancy()), **asdict(self.sender.stats())}

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
