"""Request → engine input, as plain Python (no Triton): what the aggregated model runs per request.

``AggregatedPipeline.prepare`` renders the chat template, loads and decodes every media item (through the shared
MediaLoader: http(s) with its URL policy, a decoded-image cache), and returns the vLLM prompt (text +
``multi_modal_data``) with the raw media left to vLLM's own processor.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from mmtriton.chat import ChatFormatter
from mmtriton.families import Family, family_for
from mmtriton.media.loader import MediaLoader
from mmtriton.protocol import GenerateRequest, InvalidInput, MediaItem
from mmtriton.settings import Settings


@dataclass
class EngineInput:
    prompt: dict[str, Any]  # vLLM prompt: {"prompt": str, "multi_modal_data": {...}}


class AggregatedPipeline:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.model_path = settings.model_path()
        self.family: Family = family_for(self.model_path)
        self.chat = ChatFormatter(self.model_path)
        self.media = MediaLoader(settings)

    def limit_mm_per_prompt(self) -> dict[str, int]:
        return {kind: self.settings.max_media_items for kind in self.family.modalities}

    async def load_media(self, item: MediaItem) -> Any:
        if item.kind == "image":
            return await self.media.load_image(item)
        if item.kind == "audio":
            rate = self.family.audio_sample_rate
            return (await self.media.load_audio(item, rate), rate)
        raise InvalidInput(f"{item.where}: {item.kind} input is not supported by the aggregated model yet")

    async def prepare(self, request: GenerateRequest) -> EngineInput:
        self.family.check_media([m.kind for m in request.media], self.model_path)
        prompt: dict[str, Any] = {"prompt": self.chat.render(request.messages)}
        loaded = await asyncio.gather(*(self.load_media(item) for item in request.media))
        mm: dict[str, list[Any]] = {}
        for item, value in zip(request.media, loaded, strict=True):
            mm.setdefault(item.kind, []).append(value)
        if mm:
            prompt["multi_modal_data"] = mm
        return EngineInput(prompt=prompt)
