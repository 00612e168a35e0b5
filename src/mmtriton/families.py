"""Model-family registry: what each family takes and how its media reach vLLM.

Chosen by the checkpoint's ``config.json`` ``model_type`` (never by substrings of a name or path). A model
type not listed here is served as text only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mmtriton.protocol import InvalidInput


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    # Media kinds the model takes, in the order of the public contract.
    modalities: tuple[str, ...]
    # Sample rate the audio tower expects (audio families only).
    audio_sample_rate: int = 16000
    # How precomputed image embeddings reach vLLM: "qwen2_vl" = flat [tokens, hidden] + image_grid_thw;
    # "" = this family takes no embeddings from our encoders (yet).
    embeds_format: str = ""
    # Qwen2-VL: patches merged per token side.
    merge_size: int = 2

    def check_layout(self, layout) -> None:
        """Refuse embeddings whose shape and grid disagree, before they can reach (and kill) the engine."""
        from mmtriton.protocol import InvalidInput

        if self.embeds_format == "qwen2_vl":
            grid = layout.extra.get("image_grid_thw")
            if not (isinstance(grid, list) and len(grid) == 3 and all(isinstance(v, int) and v > 0 for v in grid)):
                raise InvalidInput(f"image embedding: image_grid_thw {grid!r} is not three positive integers")
            if grid[0] * grid[1] * grid[2] != layout.num_tokens * self.merge_size**2:
                raise InvalidInput(f"image embedding: {layout.num_tokens} tokens do not match grid {grid}")
        elif not self.embeds_format:
            raise InvalidInput(f"model family {self.name} takes no precomputed embeddings here yet")

    def embeddings_mm_data(self, tensors: list, layouts: list) -> dict:
        """vLLM ``multi_modal_data`` for precomputed image embeddings, one tensor per image in prompt order."""
        import torch

        if self.embeds_format == "qwen2_vl":
            return {"image": {
                "image_embeds": torch.cat(tensors),
                "image_grid_thw": torch.tensor([m.extra["image_grid_thw"] for m in layouts], dtype=torch.long),
            }}
        raise ValueError(f"model family {self.name} takes no precomputed embeddings here yet")

    def check_media(self, kinds: list[str], model: str) -> None:
        for kind in dict.fromkeys(kinds):
            if kind not in self.modalities:
                takes = ", ".join(self.modalities) or "text only"
                raise InvalidInput(f"model {model} ({self.name}) does not take {kind} input (it takes: {takes})")


FAMILIES: tuple[Family, ...] = (
    Family("qwen2-vl", ("qwen2_vl", "qwen2_5_vl"), ("image", "video"), embeds_format="qwen2_vl"),
    Family("qwen2-audio", ("qwen2_audio",), ("audio",)),
    Family("llava", ("llava",), ("image",)),
)
TEXT_ONLY = Family("text", (), ())


def checkpoint_config(model_path: str | Path) -> dict:
    """The checkpoint's config.json."""
    config = Path(model_path) / "config.json"
    try:
        return json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {config}: {exc}") from exc


def model_type_of(model_path: str | Path) -> str:
    return str(checkpoint_config(model_path).get("model_type", ""))


def family_for(model_path: str | Path) -> Family:
    model_type = model_type_of(model_path)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return TEXT_ONLY
