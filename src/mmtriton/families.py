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

    def check_media(self, kinds: list[str], model: str) -> None:
        for kind in dict.fromkeys(kinds):
            if kind not in self.modalities:
                takes = ", ".join(self.modalities) or "text only"
                raise InvalidInput(f"model {model} ({self.name}) does not take {kind} input (it takes: {takes})")


FAMILIES: tuple[Family, ...] = (
    Family("qwen2-vl", ("qwen2_vl", "qwen2_5_vl"), ("image", "video")),
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
