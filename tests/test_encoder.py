"""The image encoder loads only the vision tower, equals HF's own image features, and vLLM given its
embeddings generates the same tokens as vLLM given the pixels."""

from __future__ import annotations

import pytest
import torch

from conftest import pattern_image
from mmtriton.encoder import Qwen2VLImageEncoder, load_weights

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def encoder(tiny_models):
    return Qwen2VLImageEncoder(str(tiny_models["qwen2-vl"]))


def test_only_vision_weights_are_loaded(tiny_models, encoder):
    weights = load_weights(tiny_models["qwen2-vl"], Qwen2VLImageEncoder.WEIGHT_PREFIXES)
    assert weights and all(not k.startswith(("model.", "lm_head", "layers.", "embed_tokens")) for k in weights)
    names = {n for n, _ in encoder.tower.named_parameters()}
    assert names == set(weights)


def test_encoder_equals_hf_image_features(tiny_models, encoder):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    path = tiny_models["qwen2-vl"]
    images = [pattern_image(100, 80, 1), pattern_image(130, 90, 2), pattern_image(60, 60, 3)]
    got = encoder.encode_many(images)
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    inputs = AutoProcessor.from_pretrained(path).image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
        want = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    assert [list(g.grid_thw) for g in got] == inputs["image_grid_thw"].tolist()
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.embeddings, w)
    # One batch of three ≈ three batches of one: the same to float32 rounding (matmul blocking depends on the
    # row count, so bits can differ; vLLM's own encoder batches the same way).
    for img, g in zip(images, got, strict=True):
        single = encoder.encode_many([img])[0].embeddings
        assert single.shape == g.embeddings.shape
        assert torch.allclose(single, g.embeddings, rtol=1e-5, atol=1e-5)


def test_vllm_with_embeddings_equals_vllm_with_pixels(offline_vl, encoder):
    from vllm import SamplingParams

    images = [pattern_image(100, 80, 1), pattern_image(130, 90, 2)]
    encoded = encoder.encode_many(images)
    prompt = ("<|im_start|>user\n" + "<|vision_start|><|image_pad|><|vision_end|>" * 2
              + "Compare.<|im_end|>\n<|im_start|>assistant\n")
    params = SamplingParams(max_tokens=24, temperature=0)
    pixels = offline_vl.generate({"prompt": prompt, "multi_modal_data": {"image": images}}, params, use_tqdm=False)
    embeds = offline_vl.generate({"prompt": prompt, "multi_modal_data": {"image": {
        "image_embeds": torch.cat([e.embeddings for e in encoded]),
        "image_grid_thw": torch.tensor([list(e.grid_thw) for e in encoded]),
    }}}, params, use_tqdm=False)
    assert list(embeds[0].outputs[0].token_ids) == list(pixels[0].outputs[0].token_ids)
    assert len(embeds[0].prompt_token_ids) == len(pixels[0].prompt_token_ids)
