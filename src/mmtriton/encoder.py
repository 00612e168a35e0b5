"""Vision encoders that load only the vision tower (+ projector) of a checkpoint, never the language model.

``Qwen2VLImageEncoder.encode_many(items)`` runs the model's own image processor (images) and video processor
(videos: sampled frames) and the tower over a batch of items (from one or several requests: one forward pass) and
returns one :class:`~mmtriton.encoder_service.EncodedMedia` per item, in the format the LLM engine takes as
embeddings input. Qwen2-VL's one tower serves both kinds. Which tower and format is the family's business
(mmtriton.families).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL import Image

    from mmtriton.encoder_service import EncodedMedia
    from mmtriton.media.loader import MediaLoader
    from mmtriton.media.video import SampledVideo
    from mmtriton.protocol import MediaItem, VideoOptions

log = logging.getLogger(__name__)


def load_weights(model_path: str | Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Read only the tensors under ``prefixes`` (prefix stripped) from a safetensors checkpoint, sharded or not."""
    from safetensors import safe_open

    path = Path(model_path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted({f for k, f in weight_map.items() if k.startswith(prefixes)})
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                for prefix in prefixes:
                    if key.startswith(prefix):
                        out[key[len(prefix):]] = f.get_tensor(key)
                        break
    if not out:
        raise ValueError(f"no weights under {prefixes} in {path}")
    return out


class Qwen2VLImageEncoder:
    """Qwen2-VL / Qwen2.5-VL vision tower (its merger is the projector) for images and videos: flat [tokens, hidden]
    + the item's [t, h, w] grid (image_grid_thw / video_grid_thw)."""

    WEIGHT_PREFIXES = ("model.visual.", "visual.")
    kind = "image"  # the encoder model's name (encoder_image)
    kinds = ("image", "video")  # the media kinds it encodes

    def __init__(self, model_path: str, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoImageProcessor, AutoVideoProcessor

        t0 = time.monotonic()
        config = AutoConfig.from_pretrained(model_path)
        self.processor = AutoImageProcessor.from_pretrained(model_path)
        # The checkpoint's own video processor, as vLLM's Qwen2-VL processor runs it on the frames we give it.
        self.video_processor = AutoVideoProcessor.from_pretrained(model_path)
        self.merge_size = int(config.vision_config.spatial_merge_size)
        self.tower = _build_tower(config).to(dtype).eval()
        missing, unexpected = self.tower.load_state_dict(load_weights(model_path, self.WEIGHT_PREFIXES), strict=False)
        if missing or unexpected:
            raise ValueError(f"vision tower weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.dtype = dtype
        self.hidden_size = int(config.vision_config.hidden_size)
        log.info("Qwen2-VL vision tower loaded from %s in %.1f s", model_path, time.monotonic() - t0)

    async def load(self, media: MediaLoader, item: MediaItem,
                   video: VideoOptions | None = None) -> Image.Image | SampledVideo:
        if item.kind == "video":
            return await media.load_video(item, video)
        return await media.load_image(item)

    def _pixels(self, images: list[Image.Image], videos: list[SampledVideo]) -> tuple[torch.Tensor, torch.Tensor]:
        """(patches, grid rows): the images' then the videos', as the checkpoint's processors make them."""
        pixels, grids = [], []
        if images:
            inputs = self.processor(images=images, return_tensors="pt")
            pixels.append(inputs["pixel_values"])
            grids.append(inputs["image_grid_thw"])
        if videos:
            # The frames are already sampled (our loader): the processor must not sample again. vLLM's processor
            # gives Qwen2-VL's video processor the same frames with the same default (do_sample_frames=False).
            inputs = self.video_processor(videos=[v.frames for v in videos], do_sample_frames=False,
                                          return_tensors="pt")
            pixels.append(inputs["pixel_values_videos"])
            grids.append(inputs["video_grid_thw"])
        return torch.cat(pixels), torch.cat(grids)

    @torch.inference_mode()
    def encode_many(self, items: list[Image.Image | SampledVideo]) -> list[EncodedMedia]:
        """Images and videos (in any order) through the tower in one forward pass (attention stays within each
        item: the grid rows delimit them); one EncodedMedia per item, in the order given."""
        from PIL import Image

        from mmtriton.encoder_service import EncodedMedia

        if not items:
            return []
        is_video = [not isinstance(item, Image.Image) for item in items]
        images = [item for item, v in zip(items, is_video, strict=True) if not v]
        videos = [item for item, v in zip(items, is_video, strict=True) if v]
        pixels, grid = self._pixels(images, videos)
        out = self.tower(pixels.to(self.dtype), grid_thw=grid)
        merged = out.pooler_output if hasattr(out, "pooler_output") else out
        sizes = (grid.prod(-1) // self.merge_size**2).tolist()
        encoded = [
            EncodedMedia(emb.contiguous(), (int(g[0]), int(g[1]), int(g[2])))
            for emb, g in zip(torch.split(merged, sizes), grid.tolist(), strict=True)
        ]
        # Back to the items' order: the images came first, then the videos.
        image_out, video_out = iter(encoded[:len(images)]), iter(encoded[len(images):])
        return [next(video_out) if v else next(image_out) for v in is_video]


def _build_tower(config):
    model_type = config.model_type
    if model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel as T
    else:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel as T
    return T._from_config(config.vision_config)


def image_encoder_for(model_path: str, dtype: torch.dtype = torch.float32):
    """The image encoder of the checkpoint's family (chosen by config.json model_type)."""
    from mmtriton.families import family_for

    family = family_for(model_path)
    if family.name == "qwen2-vl":
        return Qwen2VLImageEncoder(model_path, dtype)
    raise ValueError(f"no image encoder for model family {family.name} ({model_path}) yet")
