"""Audio encoder that loads only the audio tower + projector of a Qwen2-Audio checkpoint, never the language model.

``Qwen2AudioEncoder.encode(waves)`` runs the checkpoint's own feature extractor (Whisper log-mel) and the tower over
a batch of clips (from one or several requests: one forward pass) and returns one :class:`EncodedAudio` per clip:
the projector's output cut to the clip's valid length, exactly what HF ``Qwen2AudioForConditionalGeneration`` and
vLLM's ``qwen2_audio.py`` put in place of the clip's ``<|AUDIO|>`` tokens. :func:`audio_embeddings_mm_data` wraps
them in the ``multi_modal_data`` vLLM 0.32 takes with ``enable_mm_embeds=True``.

Lengths (both follow from the feature extractor config, 16 kHz / hop 160 / 30 s for Qwen2-Audio):

- Every clip is padded to the extractor's window (``n_samples``: 30 s) and the tower always sees 3000 mel frames;
  the valid part is ``ceil(samples / hop)`` frames → ``(frames - 1) // 2 + 1`` after conv2 → ``(that - 2) // 2 + 1``
  tokens after the pooler: 25 tokens per second, 750 for a full window.
- Too short: a clip under ``min_samples`` (321 samples, 20.06 ms) gives 0 tokens; vLLM refuses it ("The audio
  (len=…) is too short to be represented inside the model"), so :meth:`Qwen2AudioEncoder.check_length` refuses the
  same clips before the tower, per item, so one bad clip does not fail the rest of a batch.
- Too long: vLLM calls the HF processor with ``truncation=True`` (and HF's own default is the same), so a clip
  longer than the window is cut to its first 30 s (750 tokens), not refused. ``encode`` does the same.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mmtriton.encoder import load_weights
from mmtriton.protocol import InvalidInput

log = logging.getLogger(__name__)


@dataclass
class EncodedAudio:
    embeddings: torch.Tensor  # [num_tokens, hidden] (contiguous): what replaces the clip's <|AUDIO|> token

    @property
    def num_tokens(self) -> int:
        return int(self.embeddings.shape[0])


def output_lengths(mel_frames: torch.Tensor) -> torch.Tensor:
    """Tokens the tower gives for ``mel_frames`` valid frames (HF ``_get_feat_extract_output_lengths``)."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


class _AudioTowerAndProjector(nn.Module):
    """The checkpoint's audio half, with its module names (state-dict keys = checkpoint keys, prefix-stripped)."""

    def __init__(self, config):
        from transformers.models.qwen2_audio.modeling_qwen2_audio import (
            Qwen2AudioEncoder as HFQwen2AudioEncoder,
        )
        from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioMultiModalProjector

        super().__init__()
        self.audio_tower = HFQwen2AudioEncoder._from_config(config.audio_config)
        self.multi_modal_projector = Qwen2AudioMultiModalProjector(config)


class AudioSpec:
    """What a Qwen2-Audio checkpoint's feature extractor says about clips: rate, window, tokens per clip, the
    shortest clip it can represent. Cheap (no weights): the aggregated path checks clips with it too."""

    def __init__(self, feature_extractor):
        # The processor config's feature_extractor section (WhisperFeatureExtractor); vLLM reads the same one.
        self.feature_extractor = feature_extractor
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.hop_length = int(feature_extractor.hop_length)
        self.max_samples = int(feature_extractor.n_samples)  # the window; longer clips are truncated to it

    @classmethod
    def of(cls, model_path: str) -> AudioSpec:
        from transformers import AutoFeatureExtractor

        return cls(AutoFeatureExtractor.from_pretrained(model_path))

    def mel_frames(self, num_samples: int) -> int:
        """Valid mel frames of a clip: WhisperFeatureExtractor's attention mask ``[::hop]`` over the padded window."""
        return math.ceil(min(num_samples, self.max_samples) / self.hop_length)

    def num_tokens(self, num_samples: int) -> int:
        return int(output_lengths(torch.tensor(self.mel_frames(num_samples))))

    @property
    def min_samples(self) -> int:
        """The shortest clip (samples at ``sample_rate``) that gives ≥ 1 token; vLLM refuses anything shorter."""
        frames = 1
        while int(output_lengths(torch.tensor(frames))) < 1:
            frames += 1
        return (frames - 1) * self.hop_length + 1

    def check_length(self, wave: np.ndarray, where: str) -> None:
        """Raise InvalidInput (naming ``where``) for a clip the model cannot represent (``encode`` assumes checked
        clips: a too-short one would give an empty tensor, which vLLM refuses)."""
        if wave.ndim != 1:
            raise InvalidInput(f"{where}: audio must be mono (1-D samples), got shape {tuple(wave.shape)}")
        if len(wave) < self.min_samples:
            raise InvalidInput(
                f"{where}: audio is {len(wave) / self.sample_rate:.4g} s long, shorter than the model's minimum of "
                f"{self.min_samples / self.sample_rate:.4g} s ({len(wave)} < {self.min_samples} samples at "
                f"{self.sample_rate} Hz)"
            )



class Qwen2AudioEncoder(AudioSpec):
    """Qwen2-Audio audio tower + multi_modal_projector: one [tokens, hidden] tensor per clip."""

    # transformers 5.19 saves them top-level; a checkpoint saved from Qwen2AudioModel has them under "model.".
    TOWER_PREFIXES = ("audio_tower.", "model.audio_tower.")
    PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")

    def __init__(self, model_path: str, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoFeatureExtractor

        t0 = time.monotonic()
        config = AutoConfig.from_pretrained(model_path)
        super().__init__(AutoFeatureExtractor.from_pretrained(model_path))
        self.model = _AudioTowerAndProjector(config).to(dtype).eval()
        for module, prefixes in ((self.model.audio_tower, self.TOWER_PREFIXES),
                                 (self.model.multi_modal_projector, self.PROJECTOR_PREFIXES)):
            missing, unexpected = module.load_state_dict(load_weights(model_path, prefixes), strict=False)
            if missing or unexpected:
                raise ValueError(f"audio weights {prefixes[0]}* do not match: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        self.dtype = dtype
        self.hidden_size = int(config.text_config.hidden_size)  # the projector's output = the LM's hidden size
        log.info("Qwen2-Audio audio tower loaded from %s in %.1f s", model_path, time.monotonic() - t0)

    @property
    def tower(self) -> nn.Module:
        return self.model.audio_tower

    @torch.inference_mode()
    def encode(self, waves: list[np.ndarray]) -> list[EncodedAudio]:
        """Mono float clips at ``sample_rate``, each already passed ``check_length``: one forward pass for all."""
        if not waves:
            return []
        from transformers.masking_utils import create_bidirectional_mask

        # What Qwen2AudioProcessor does (padding to the window, attention mask) plus vLLM's truncation=True.
        inputs = self.feature_extractor(
            [np.asarray(w, dtype=np.float32) for w in waves], sampling_rate=self.sample_rate,
            return_attention_mask=True, padding="max_length", truncation=True, return_tensors="pt",
        )
        features = inputs["input_features"].to(self.dtype)
        feature_mask = inputs["attention_mask"]
        # From here on as HF Qwen2AudioModel.forward: key padding mask after conv2, tower, projector, cut.
        feat_lengths, out_lengths = self.tower._get_feat_extract_output_lengths(feature_mask.sum(-1))
        batch, _, mel_len = features.shape
        max_seq_len = (mel_len - 2) // 2 + 1
        valid = torch.arange(max_seq_len, dtype=feat_lengths.dtype)[None, :] < feat_lengths[:, None]
        mask = create_bidirectional_mask(
            config=self.tower.config,
            inputs_embeds=torch.zeros((batch, max_seq_len, 1), dtype=self.dtype),
            attention_mask=valid.to(torch.long),
        )
        hidden = self.tower(features, attention_mask=mask).last_hidden_state
        projected = self.model.multi_modal_projector(hidden)
        return [EncodedAudio(projected[i, :n].contiguous()) for i, n in enumerate(out_lengths.tolist())]


def audio_embeddings_mm_data(tensors: list[torch.Tensor]) -> dict:
    """``multi_modal_data`` for vLLM 0.32 (``enable_mm_embeds=True``) from per-clip [num_tokens, hidden] tensors,
    in prompt order; the prompt keeps one ``<|audio_bos|><|AUDIO|><|audio_eos|>`` per clip (vLLM expands it).

    A bare list of 2-D tensors (vLLM's ``AudioEmbeddingItems``): clips may differ in length, and vLLM checks each
    one's ndim and hidden size against the model before anything reaches the engine. (The Qwen2-Audio dict form
    ``{"audio_embeds": ...}`` skips the hidden-size check.)
    """
    if not tensors:
        raise ValueError("no audio embeddings")
    hidden = tensors[0].shape[-1]
    for i, t in enumerate(tensors):
        if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] != hidden:
            raise ValueError(f"audio embedding {i} must be [num_tokens >= 1, {hidden}], got {tuple(t.shape)}")
    return {"audio": list(tensors)}
