"""Model-family registry: what each family takes and how its media reach vLLM.

Chosen by the checkpoint's ``config.json`` ``model_type`` (never by substrings of a name or path). A model
type not listed here is served as text only.

Precomputed embeddings (the disaggregated path) have one *format* per (family, media kind): how a layout is
checked before it can reach (and kill) the engine, and how tensors become vLLM ``multi_modal_data``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmtriton.protocol import InvalidInput

if TYPE_CHECKING:  # wire imports nothing of ours but protocol; kept out of import time anyway
    import torch

    from mmtriton.wire import MediaLayout


@dataclass(frozen=True)
class EmbedsFormat:
    """How one family takes precomputed embeddings of one media kind."""

    check: Callable[[MediaLayout, int], None]  # (layout, merge_size) → raises InvalidInput
    mm_data: Callable[[list[torch.Tensor], list[MediaLayout]], dict[str, Any]]  # one kind's items → its entry
    # The prompt's placeholder for one item (vLLM expands it). Prefill checks the counts agree: vLLM reads a
    # placeholder without an embedding as plain text, a silent wrong answer.
    placeholder: str


def _check_grid(layout: MediaLayout, merge_size: int) -> None:
    grid = layout.grid_thw
    if grid is None or not all(v > 0 for v in grid):
        raise InvalidInput(f"{layout.kind} embedding: grid_thw {grid!r} is not three positive integers")
    if grid[0] * grid[1] * grid[2] != layout.num_tokens * merge_size**2:
        raise InvalidInput(f"{layout.kind} embedding: {layout.num_tokens} tokens do not match grid {list(grid)}")


def _qwen2_vl_images(tensors: list[torch.Tensor], layouts: list[MediaLayout]) -> dict[str, Any]:
    import torch

    # Qwen2-VL takes one flat [total_tokens, hidden] tensor plus one grid row per image.
    return {"image": {"image_embeds": torch.cat(tensors),
                      "image_grid_thw": torch.tensor([list(m.grid_thw or ()) for m in layouts], dtype=torch.long)}}


def _qwen2_vl_videos(tensors: list[torch.Tensor], layouts: list[MediaLayout]) -> dict[str, Any]:
    import torch

    # As images: one flat tensor plus one [t, h, w] row per video. Qwen2-VL's M-RoPE needs nothing else (its
    # vLLM field config has no second_per_grid_ts: every temporal step is one position).
    return {"video": {"video_embeds": torch.cat(tensors),
                      "video_grid_thw": torch.tensor([list(m.grid_thw or ()) for m in layouts], dtype=torch.long)}}


def _check_no_grid(layout: MediaLayout, _merge_size: int) -> None:
    if layout.grid_thw is not None:
        raise InvalidInput(f"{layout.kind} embedding: unexpected grid_thw {list(layout.grid_thw)}")


def _qwen2_audio(tensors: list[torch.Tensor], _layouts: list[MediaLayout]) -> dict[str, Any]:
    from mmtriton.audio_encoder import audio_embeddings_mm_data

    # A bare list of [tokens, hidden] tensors: clips differ in length, and vLLM checks their hidden size before
    # the engine (the {"audio_embeds": ...} dict form skips that check, and a wrong size killed the engine).
    return audio_embeddings_mm_data(list(tensors))


QWEN2_VL_IMAGE = EmbedsFormat(_check_grid, _qwen2_vl_images, "<|image_pad|>")
QWEN2_VL_VIDEO = EmbedsFormat(_check_grid, _qwen2_vl_videos, "<|video_pad|>")
QWEN2_AUDIO = EmbedsFormat(_check_no_grid, _qwen2_audio, "<|AUDIO|>")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    # Media kinds the model takes, in the order of the public contract.
    modalities: tuple[str, ...]
    # Precomputed-embedding formats by media kind (the kinds our encoders serve for this family). A kind the
    # family takes but has no format for is served by multimodal_agg only (the disaggregated path refuses it).
    embeds: dict[str, EmbedsFormat] = field(default_factory=dict)
    # Qwen2-VL: patches merged per token side.
    merge_size: int = 2
    # Model types of the family whose embeddings formats differ: model type → (formats, why), e.g. one that
    # vLLM cannot take a kind's embeddings for with the right positions. family_for applies it.
    embeds_by_model_type: dict[str, tuple[dict[str, EmbedsFormat], str]] = field(default_factory=dict)
    # Why the kinds left out of ``embeds`` are (said in the disaggregated path's refusal).
    embeds_note: str = ""
    # The processor spaces a video's temporal positions by ``mm_processor_kwargs["fps"]`` (one rate per prompt),
    # not by the frames' metadata: the aggregated path passes the rate the frames were sampled at.
    video_fps_kwarg: bool = False

    def check_layout(self, layout: MediaLayout) -> None:
        """Refuse embeddings whose kind, shape and grid disagree, before they can reach (and kill) the engine."""
        fmt = self.embeds.get(layout.kind)
        if fmt is None:
            raise InvalidInput(f"model family {self.name} takes no precomputed {layout.kind} embeddings")
        fmt.check(layout, self.merge_size)

    def check_counts(self, prompt: str, layouts: Sequence[MediaLayout]) -> None:
        """Every embedding format's placeholders in the prompt == the items of that kind."""
        for kind, fmt in self.embeds.items():
            have, want = sum(m.kind == kind for m in layouts), prompt.count(fmt.placeholder)
            if have != want:
                raise InvalidInput(f"the prompt has {want} {kind} placeholder(s) but {have} {kind} embedding(s)")

    def embeddings_mm_data(self, tensors: Sequence[torch.Tensor], layouts: Sequence[MediaLayout]) -> dict:
        """vLLM ``multi_modal_data`` for precomputed embeddings, one tensor per item. Items of one kind keep their
        order (vLLM fills that kind's placeholders in order); kinds are independent."""
        mm: dict[str, Any] = {}
        for kind in dict.fromkeys(m.kind for m in layouts):
            mine = [i for i, m in enumerate(layouts) if m.kind == kind]
            fmt = self.embeds.get(kind)
            if fmt is None:
                raise InvalidInput(f"model family {self.name} takes no precomputed {kind} embeddings")
            mm.update(fmt.mm_data([tensors[i] for i in mine], [layouts[i] for i in mine]))
        return mm

    def check_media(self, kinds: list[str], model: str) -> None:
        for kind in dict.fromkeys(kinds):
            if kind not in self.modalities:
                takes = ", ".join(self.modalities) or "text only"
                raise InvalidInput(f"model {model} ({self.name}) does not take {kind} input (it takes: {takes})")


FAMILIES: tuple[Family, ...] = (
    Family("qwen2-vl", ("qwen2_vl", "qwen2_5_vl"), ("image", "video"),
           embeds={"image": QWEN2_VL_IMAGE, "video": QWEN2_VL_VIDEO},
           # Qwen2.5-VL's M-RoPE spaces a video's temporal positions by second_per_grid_ts, which vLLM 0.32 takes
           # with pixels only (its embeddings fields are Qwen2-VL's): decode could not rebuild the positions.
           embeds_by_model_type={"qwen2_5_vl": ({"image": QWEN2_VL_IMAGE}, "vLLM 0.32 takes Qwen2.5-VL video "
                                                "embeddings without second_per_grid_ts, so their positions would "
                                                "be wrong")}),
    Family("qwen2-audio", ("qwen2_audio",), ("audio",), embeds={"audio": QWEN2_AUDIO}),
    Family("llava", ("llava",), ("image",)),
    # Qwen2.5-Omni's thinker: image + audio + video in one model, raw media only (encoded inside vLLM).
    Family("qwen2.5-omni", ("qwen2_5_omni",), ("image", "audio", "video"), video_fps_kwarg=True,
           embeds_note="vLLM 0.32 cannot take Qwen2.5-Omni embeddings (image embeddings crash the engine, audio "
                       "embeddings are refused)"),
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
            if model_type in family.embeds_by_model_type:
                embeds, note = family.embeds_by_model_type[model_type]
                return replace(family, embeds=embeds, embeds_note=note)
            return family
    return TEXT_ONLY
