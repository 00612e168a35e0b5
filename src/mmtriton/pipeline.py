"""Request → engine input, as plain Python (no Triton): what the aggregated model runs per request.

``AggregatedPipeline.prepare`` renders the chat template, loads and decodes every media item, and returns the
vLLM prompt (text + ``multi_modal_data``) with the raw media left to vLLM's own processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmtriton.chat import ChatFormatter
from mmtriton.families import Family, family_for
from mmtriton.media.audio import decode_audio
from mmtriton.media.fetch import read_media_bytes
from mmtriton.media.image import decode_image
from mmtriton.protocol import GenerateRequest, InvalidInput, MediaItem
from mmtriton.settings import Settings


@dataclass
class EngineInput:
    prompt: dict[str, Any]  # vLLM prompt: {"prompt": str, "multi_modal_data": {...}}
    media_counts: dict[str, int]


class AggregatedPipeline:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.model_path = settings.model_path()
        self.family: Family = family_for(self.model_path)
        self.chat = ChatFormatter(self.model_path)

    def limit_mm_per_prompt(self) -> dict[str, int]:
        return {kind: self.settings.max_media_items for kind in self.family.modalities}

    def load_media(self, item: MediaItem) -> Any:
        data = read_media_bytes(item.url, item.where, item.kind, self.settings)
        if item.kind == "image":
            return decode_image(data, item.where, self.settings.max_image_pixels)
        if item.kind == "audio":
            wave = decode_audio(data, item.where, self.family.audio_sample_rate, self.settings.max_audio_seconds)
            return (wave, self.family.audio_sample_rate)
        raise InvalidInput(f"{item.where}: {item.kind} input is not supported by the aggregated model yet")

    def prepare(self, request: GenerateRequest) -> EngineInput:
        """Blocking (media decoding): run it off the engine's event loop."""
        self.family.check_media([m.kind for m in request.media], self.model_path)
        prompt: dict[str, Any] = {"prompt": self.chat.render(request.messages)}
        mm: dict[str, list[Any]] = {}
        for item in request.media:
            mm.setdefault(item.kind, []).append(self.load_media(item))
        if mm:
            prompt["multi_modal_data"] = mm
        return EngineInput(prompt=prompt, media_counts={k: len(v) for k, v in mm.items()})
