"""The tiny models are sound references: plain vLLM offline greedy tokens == HF ``generate`` (float32)."""

from __future__ import annotations

import pytest
import torch

from conftest import pattern_image, tone

pytestmark = pytest.mark.engine
MAX_TOKENS = 24


def vllm_greedy(llm, prompt: dict) -> list[int]:
    from vllm import SamplingParams

    out = llm.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def hf_greedy(model, inputs) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def hf_vl(tiny_models):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    path = tiny_models["qwen2-vl"]
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)


def _chat(parts: list[dict], text: str) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def test_text_vllm_equals_hf(offline_vl, hf_vl):
    model, processor = hf_vl
    prompt = processor.apply_chat_template(_chat([], "Tell me about the river."), add_generation_prompt=True,
                                           tokenize=False)
    hf = hf_greedy(model, processor(text=[prompt], return_tensors="pt"))
    assert vllm_greedy(offline_vl, {"prompt": prompt}) == hf
    assert len(set(hf)) > 4, "random weights should not repeat one token"


@pytest.mark.parametrize("n_images", [1, 2])
def test_image_vllm_equals_hf(offline_vl, hf_vl, n_images):
    model, processor = hf_vl
    images = [pattern_image(100 + 30 * i, 80, seed=i) for i in range(n_images)]
    prompt = processor.apply_chat_template(
        _chat([{"type": "image"}] * n_images, "Describe the image."), add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    hf = hf_greedy(model, inputs)
    assert vllm_greedy(offline_vl, {"prompt": prompt, "multi_modal_data": {"image": images}}) == hf


def test_images_change_the_tokens(offline_vl):
    """The image really reaches the model: another image gives other tokens."""
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n"
    a = vllm_greedy(offline_vl, {"prompt": prompt, "multi_modal_data": {"image": pattern_image(100, 80, 1)}})
    b = vllm_greedy(offline_vl, {"prompt": prompt, "multi_modal_data": {"image": pattern_image(100, 80, 2)}})
    assert a != b


def test_audio_vllm_equals_hf(offline_audio, tiny_models):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    path = tiny_models["qwen2-audio"]
    model = Qwen2AudioForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    wave = tone(1.5)
    prompt = processor.apply_chat_template(_chat([{"type": "audio"}], "What do you hear?"),
                                           add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], audio=[wave], sampling_rate=16000, return_tensors="pt")
    hf = hf_greedy(model, inputs)
    assert vllm_greedy(offline_audio, {"prompt": prompt, "multi_modal_data": {"audio": (wave, 16000)}}) == hf
    assert len(set(hf)) > 4
