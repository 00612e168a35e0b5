"""Request → engine input, as plain Python (no Triton): what the aggregated model runs per request.

``AggregatedPipeline.prepare`` renders the chat template, loads and decodes every media item (through the shared
MediaLoader: http(s) with its URL policy, decoded-media caches; videos: frames sampled as the request's
``media_io_kwargs.video`` says), and returns the vLLM prompt (text + ``multi_modal_data``) with the raw media left
to vLLM's own processor.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mmtriton.chat import ChatFormatter
from mmtriton.families import Family, family_for
from mmtriton.media.loader import MediaLoader
from mmtriton.media.video import SampledVideo
from mmtriton.protocol import GenerateRequest, InvalidInput, MediaItem, VideoOptions
from mmtriton.settings import Settings


class AggregatedPipeline:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.model_path = settings.model_path()
        self.family: Family = family_for(self.model_path)
        self.chat = ChatFormatter(self.model_path)
        self.media = MediaLoader(settings)
        self._audio_spec = None  # (sample rate, shortest clip in samples), read on first audio

    def limit_mm_per_prompt(self) -> dict[str, int]:
        return {kind: self.settings.max_media_items for kind in self.family.modalities}

    def audio_spec(self):
        if self._audio_spec is None:
            from mmtriton.audio_encoder import AudioSpec

            self._audio_spec = AudioSpec.of(self.model_path)
        return self._audio_spec

    async def load_media(self, item: MediaItem, video: VideoOptions | None = None) -> Any:
        if item.kind == "image":
            return await self.media.load_image(item)
        if item.kind == "audio":
            spec = self.audio_spec()
            wave = await self.media.load_audio(item, spec.sample_rate)
            spec.check_length(wave, item.where)  # vLLM's own refusal would not name the item
            return (wave, spec.sample_rate)
        if item.kind == "video":
            return await self.media.load_video(item, video)
        raise InvalidInput(f"{item.where}: {item.kind} input is not supported by the aggregated model yet")

    async def prepare(self, request: GenerateRequest) -> dict[str, Any]:
        """The vLLM prompt: {"prompt": str, "multi_modal_data": {...}}."""
        self.family.check_media([m.kind for m in request.media], self.model_path)
        prompt: dict[str, Any] = {"prompt": self.chat.render(request.messages)}
        io_kwargs = request.sampling.media_io_kwargs
        video = io_kwargs.video if io_kwargs is not None else None
        loaded = await asyncio.gather(*(self.load_media(item, video) for item in request.media))
        mm: dict[str, list[Any]] = {}
        for item, value in zip(request.media, loaded, strict=True):
            if isinstance(value, SampledVideo):
                # vLLM's (frames, metadata) form; the frames are sampled already (metadata: do_sample_frames=False).
                value = (value.frames, value.vllm_metadata())
            mm.setdefault(item.kind, []).append(value)
        if mm:
            prompt["multi_modal_data"] = mm
        videos = [(item, value) for item, value in zip(request.media, loaded, strict=True) if item.kind == "video"]
        if self.family.video_fps_kwarg and videos:
            prompt["mm_processor_kwargs"] = {"fps": one_video_rate(videos)}
        return prompt


def one_video_rate(videos: list[tuple[MediaItem, SampledVideo]]) -> float:
    """The sampled frame rate of a request's videos, for a processor that takes one rate per prompt."""
    (first, video), *rest = videos
    for item, other in rest:
        if abs(other.sampled_fps - video.sampled_fps) > 1e-3 * video.sampled_fps:
            raise InvalidInput(
                f"{item.where}: sampled at {other.sampled_fps:.3g} frames/s but {first.where} at "
                f"{video.sampled_fps:.3g}: this model takes one frame rate per request; sample by fps "
                "(sampling_parameters.media_io_kwargs.video.fps) so the videos agree")
    return video.sampled_fps
