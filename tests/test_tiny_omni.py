"""The tiny Qwen2.5-Omni thinker: a checkpoint vLLM 0.32 loads and serves with image + audio + video in one
prompt, whose greedy tokens equal HF's thinker, built byte-identically every time.

About 45 s on 2 cores (engine start ~25 s, two omni builds ~6 s, HF generate ~5 s).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import MAX_MODEL_LEN, pattern_image, tone

MAX_TOKENS = 24
SAMPLE_RATE = 16000  # the Whisper feature extractor's rate; vLLM's resampler needs torchaudio (absent)


def video_frames(seed: int, num_frames: int = 4, height: int = 64, width: int = 80) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(num_frames, height, width, 3), dtype=np.uint8)


def video_item(frames: np.ndarray, fps: float = 2.0) -> tuple[np.ndarray, dict]:
    """vLLM's (frames, metadata) video item for frames already sampled: use them as given."""
    n = len(frames)
    return frames, {"fps": fps, "duration": n / fps, "total_num_frames": n, "frames_indices": list(range(n)),
                    "video_backend": "opencv", "do_sample_frames": False}


@pytest.fixture(scope="module")
def omni_path(tiny_models) -> Path:
    return tiny_models["qwen2.5-omni"]


@pytest.fixture(scope="module")
def omni_processor(omni_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(omni_path)


@pytest.fixture(scope="module")
def offline_omni(omni_path):
    from vllm import LLM

    llm = LLM(str(omni_path), dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN,
              limit_mm_per_prompt={"image": 4, "audio": 4, "video": 4}, seed=0)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def _prompt(processor, kinds: list[str], text: str = "Describe the picture, the sound and the clip.") -> str:
    messages = [{"role": "user", "content": [*({"type": k} for k in kinds), {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _generate(llm, prompt: str, mm: dict, **mm_processor_kwargs) -> tuple[list[int], list[int]]:
    from vllm import SamplingParams

    request: dict = {"prompt": prompt, "multi_modal_data": mm}
    if mm_processor_kwargs:
        request["mm_processor_kwargs"] = mm_processor_kwargs
    out = llm.generate(request, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), list(out.prompt_token_ids)


def test_checkpoint_is_a_thinker_vllm_registers(omni_path):
    from safetensors import safe_open
    from vllm.model_executor.models.registry import ModelRegistry

    config = json.loads((omni_path / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_omni" and config["enable_audio_output"] is False
    assert config["architectures"] == ["Qwen2_5OmniForConditionalGeneration"]
    assert "Qwen2_5OmniForConditionalGeneration" in ModelRegistry.get_supported_archs()
    with safe_open(omni_path / "model.safetensors", "pt") as f:
        towers = {k.split(".")[1] for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        assert all(k.startswith("thinker.") for k in f.keys())  # noqa: SIM118
    assert towers == {"model", "lm_head", "visual", "audio_tower"}  # no talker / token2wav weights


@pytest.mark.engine
def test_image_audio_video_in_one_prompt(offline_omni, omni_processor):
    processor, tok = omni_processor, omni_processor.tokenizer
    prompt = _prompt(processor, ["image", "audio", "video"])
    image, wave, frames = pattern_image(100, 80, seed=1), tone(1.5), video_frames(0)
    mm = {"image": image, "audio": (wave, SAMPLE_RATE), "video": [video_item(frames)]}
    out, prompt_ids = _generate(offline_omni, prompt, mm)
    # Each placeholder expanded to its item's token count: 100x80 image → 4x3 merged patches; 1.5 s clip →
    # 150 mel frames → 37; 4 frames of 64x80 → 2 temporal patches x 143 (Omni's 128-token minimum per pair).
    counts = {t: prompt_ids.count(tok.convert_tokens_to_ids(t)) for t in ("<|IMAGE|>", "<|AUDIO|>", "<|VIDEO|>")}
    assert counts == {"<|IMAGE|>": 12, "<|AUDIO|>": 37, "<|VIDEO|>": 286}
    assert len(out) == MAX_TOKENS and len(set(out)) > 4, f"degenerate output {out}"
    # Every item reaches the model: changing any one of them changes the answer.
    for kind, other in (("image", pattern_image(100, 80, seed=2)), ("audio", (tone(1.0), SAMPLE_RATE)),
                        ("video", [video_item(video_frames(1))])):
        assert _generate(offline_omni, prompt, {**mm, kind: other})[0] != out, f"the {kind} did not matter"


@pytest.mark.engine
def test_vllm_equals_hf_thinker(offline_omni, omni_path, omni_processor):
    """Greedy tokens == HF's thinker for image + audio + video; fps (the frames' rate, for M-RoPE time) is an
    mm_processor_kwargs entry in vLLM, not the metadata's fps."""
    from transformers import AutoConfig, Qwen2_5OmniThinkerForConditionalGeneration

    thinker_config = AutoConfig.from_pretrained(omni_path).thinker_config
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
        omni_path, config=thinker_config, dtype=torch.float32
    ).eval()
    prompt = _prompt(omni_processor, ["video", "image", "audio"], "What happens?")
    image, wave, frames = pattern_image(120, 70, seed=4), tone(0.8), video_frames(3, num_frames=6)
    fps = 1.0
    inputs = omni_processor(text=[prompt], images=[image], audio=[wave], videos=[frames],
                            sampling_rate=SAMPLE_RATE, fps=fps, return_tensors="pt")
    with torch.no_grad():
        hf = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    mm = {"image": image, "audio": (wave, SAMPLE_RATE), "video": [video_item(frames, fps)]}
    assert _generate(offline_omni, prompt, mm, fps=fps)[0] == hf.tolist()
    assert _generate(offline_omni, prompt, mm)[0] != hf.tolist(), "fps=2 (the default) should move video positions"


def test_builder_is_deterministic(tmp_path, omni_path):
    from mmtriton.tiny_models import build_qwen2_5_omni, build_stamp, tree_digest

    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # as build_all
    try:
        digests = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            build_qwen2_5_omni(tmp_path / name, None)
            digests.append(tree_digest(tmp_path / name))
    finally:
        torch.use_deterministic_algorithms(was)
    assert digests[0] == digests[1]
    if (omni_path.parent / "BUILD").read_text().strip() == build_stamp():
        assert tree_digest(omni_path) == digests[0], "the cached build differs from a fresh one"
