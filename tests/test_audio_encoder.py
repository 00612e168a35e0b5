"""The audio encoder loads only the audio tower + projector, equals HF's own audio features bit for bit, refuses the
clips vLLM refuses, and vLLM given its embeddings generates the same tokens as vLLM given the waveforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tone
from mmtriton.audio_encoder import Qwen2AudioEncoder, audio_embeddings_mm_data
from mmtriton.encoder import load_weights
from mmtriton.protocol import InvalidInput

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def encoder(tiny_models):
    return Qwen2AudioEncoder(str(tiny_models["qwen2-audio"]))


@pytest.fixture(scope="module")
def processor(tiny_models):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_models["qwen2-audio"])


def audio_prompt(processor, n_clips: int) -> str:
    messages = [{"role": "user", "content": [*[{"type": "audio"}] * n_clips,
                                             {"type": "text", "text": "What do you hear?"}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def vllm_greedy(llm, prompt: str, mm_data: dict) -> tuple[list[int], int]:
    from vllm import SamplingParams

    out = llm.generate({"prompt": prompt, "multi_modal_data": mm_data},
                       SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), len(out.prompt_token_ids)


def test_only_audio_weights_are_loaded(tiny_models, encoder):
    from safetensors import safe_open

    with safe_open(str(tiny_models["qwen2-audio"] / "model.safetensors"), framework="pt") as f:
        checkpoint = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 - not a dict
    audio_keys = {k for k in checkpoint if k.startswith(("audio_tower.", "multi_modal_projector."))}
    assert any(k.startswith("language_model.") for k in checkpoint)  # there was an LM to leave out
    state = encoder.model.state_dict()
    assert set(state) == audio_keys
    assert not any("language_model" in k or "lm_head" in k or "embed_tokens" in k for k in state)
    tower = load_weights(tiny_models["qwen2-audio"], Qwen2AudioEncoder.TOWER_PREFIXES)
    assert set(tower) == {k.removeprefix("audio_tower.") for k in audio_keys if k.startswith("audio_tower.")}
    n_audio = sum(int(np.prod(checkpoint[k])) for k in audio_keys)
    assert sum(p.numel() for p in encoder.model.parameters()) == n_audio
    assert n_audio < sum(int(np.prod(s)) for s in checkpoint.values())
    assert encoder.hidden_size == 128 and encoder.sample_rate == 16000


def test_encoder_equals_hf_audio_features(tiny_models, encoder, processor):
    """What HF's own forward scatters into the <|AUDIO|> positions (tower + projector + valid-length cut), read
    from the language model's inputs_embeds, equals the encoder's output for the same two clips in one batch."""
    from transformers import Qwen2AudioForConditionalGeneration

    waves = [tone(1.0), tone(0.37)]
    got = encoder.encode(waves)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_models["qwen2-audio"],
                                                               dtype=torch.float32).eval()
    inputs = processor(text=[audio_prompt(processor, 2)], audio=waves, sampling_rate=16000, return_tensors="pt")
    seen: dict[str, torch.Tensor] = {}

    def grab(_module, _args, kwargs):
        seen["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    is_audio = inputs["input_ids"][0] == model.config.audio_token_id
    want = seen["inputs_embeds"][0][is_audio]
    assert [g.num_tokens for g in got] == [25, 9]  # 25 tokens per second: ceil(5920 / 160) = 37 frames → 9
    assert sum(g.num_tokens for g in got) == want.shape[0]
    for g, w in zip(got, torch.split(want, [g.num_tokens for g in got]), strict=True):
        assert g.embeddings.is_contiguous() and g.embeddings.dtype == torch.float32
        assert torch.equal(g.embeddings, w)
    # One batch of two ≈ two batches of one (float32 rounding may differ with the batch's row count).
    for wave, g in zip(waves, got, strict=True):
        single = encoder.encode([wave])[0].embeddings
        assert single.shape == g.embeddings.shape
        assert torch.allclose(single, g.embeddings, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seconds", [[1.0], [1.0, 0.37]], ids=["one-clip", "two-clips"])
def test_vllm_with_embeddings_equals_vllm_with_audio(offline_audio, encoder, processor, seconds):
    waves = [tone(s) for s in seconds]
    prompt = audio_prompt(processor, len(waves))
    raw = vllm_greedy(offline_audio, prompt, {"audio": [(w, encoder.sample_rate) for w in waves]})
    mm_data = audio_embeddings_mm_data([e.embeddings for e in encoder.encode(waves)])
    assert vllm_greedy(offline_audio, prompt, mm_data) == raw
    assert len(set(raw[0])) > 4


def test_wrong_hidden_size_is_refused_before_the_engine(offline_audio, encoder, processor):
    """Why the bare-list format: vLLM checks its hidden size in the frontend (the dict form {"audio_embeds": …}
    is not checked, and a wrong one killed the engine with EngineDeadError). The engine keeps serving."""
    prompt = audio_prompt(processor, 1)
    with pytest.raises(ValueError, match="hidden dimension mismatch"):
        vllm_greedy(offline_audio, prompt, audio_embeddings_mm_data([torch.zeros(5, encoder.hidden_size // 2)]))
    wave = tone(0.5)
    assert vllm_greedy(offline_audio, prompt, audio_embeddings_mm_data(
        [encoder.encode([wave])[0].embeddings])) == vllm_greedy(offline_audio, prompt, {"audio": (wave, 16000)})


def test_mm_data_builder_refuses_what_vllm_would_choke_on(encoder):
    good = torch.zeros(3, encoder.hidden_size)
    assert audio_embeddings_mm_data([good, good[:1]])["audio"][1].shape == (1, encoder.hidden_size)
    for bad in ([], [good[:0]], [good[None]], [good, torch.zeros(3, encoder.hidden_size + 1)]):
        with pytest.raises(ValueError):
            audio_embeddings_mm_data(bad)


def test_check_length_refuses_what_vllm_refuses(offline_audio, encoder, processor):
    assert encoder.min_samples == 321  # 3 mel frames (hop 160) → 2 after conv2 → 1 token
    with pytest.raises(InvalidInput, match=r"^audio_url\[2\]: audio is 0\.01 s long, shorter than the model's "
                                           r"minimum of 0\.02006 s"):
        encoder.check_length(tone(0.01), "audio_url[2]")
    with pytest.raises(InvalidInput, match="audio_url"):
        encoder.check_length(np.zeros(encoder.min_samples - 1, np.float32), "audio_url")
    shortest = tone(1.0)[: encoder.min_samples]
    encoder.check_length(shortest, "audio_url")
    assert encoder.encode([shortest])[0].num_tokens == 1
    prompt = audio_prompt(processor, 1)
    # vLLM draws the line at the same sample: one below is refused (in the frontend), the minimum is served.
    with pytest.raises(ValueError, match="too short to be represented"):
        vllm_greedy(offline_audio, prompt, {"audio": (shortest[:-1], encoder.sample_rate)})
    raw = vllm_greedy(offline_audio, prompt, {"audio": (shortest, encoder.sample_rate)})
    assert vllm_greedy(offline_audio, prompt, audio_embeddings_mm_data([encoder.encode([shortest])[0].embeddings])) \
        == raw


def test_clip_longer_than_the_window_is_truncated_like_vllm(offline_audio, encoder, processor):
    """vLLM runs the feature extractor with truncation=True: a 31 s clip is its first 30 s (750 tokens)."""
    long = tone(31.0)
    window = long[: encoder.max_samples]
    encoded_long, encoded_window = encoder.encode([long, window])
    assert encoded_long.num_tokens == 750
    assert torch.equal(encoded_long.embeddings, encoded_window.embeddings)
    prompt = audio_prompt(processor, 1)
    raw = vllm_greedy(offline_audio, prompt, {"audio": (long, encoder.sample_rate)})
    assert raw == vllm_greedy(offline_audio, prompt, {"audio": (window, encoder.sample_rate)})
    assert vllm_greedy(offline_audio, prompt, audio_embeddings_mm_data([encoded_long.embeddings])) == raw
