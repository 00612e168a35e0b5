"""Audio through every path on a live tritonserver serving the tiny Qwen2-Audio: encoder_audio → NIXL →
llm_prefill → KV connector → llm_decode (ensemble and BLS) and multimodal_agg give the greedy tokens of plain
vLLM offline given the same samples; failures name the item on every path and leak nothing.

This module's server replaces the session's Qwen2-VL one (one pipeline server at a time: conftest runs it last).
"""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest

from client import InferenceFailed, RequestInputs, build_inputs, stream_grpc
from conftest import metric, pipeline_server
from mmtriton.testing import assert_pool_drained, audio_bytes, tone, wav_bytes

pytestmark = pytest.mark.integration
PATHS = ("multimodal_agg", "multimodal_bls", "multimodal")
GREEDY = {"max_tokens": 24, "temperature": 0.0}
RATE = 16000  # the tiny checkpoint's feature extractor rate (its processor config)
GAUGE_SETTLE_S = 1.2


def data_uri(data: bytes, subtype: str = "wav") -> str:
    return f"data:audio/{subtype};base64," + base64.b64encode(data).decode()


def decoded(data: bytes) -> np.ndarray:
    """The samples the server decodes these bytes to (our loader, the thing vLLM offline is given too)."""
    from mmtriton.media.audio import decode_audio

    return decode_audio(data, "reference", RATE, 600.0)


@pytest.fixture(scope="module")
def audio_media(media_dir):
    clips = {
        "one.wav": wav_bytes(tone(1.0), RATE),
        "short.wav": wav_bytes(tone(0.4), RATE),
        "clip.flac": audio_bytes(tone(0.8), RATE, "FLAC"),
        "clip.ogg": audio_bytes(tone(0.8), RATE, "OGG", "VORBIS"),
        "clip.mp3": audio_bytes(tone(0.8), RATE, "MP3"),
        "stereo48k.wav": audio_bytes(np.stack([tone(0.9, 48000), 0.5 * tone(0.9, 48000)], axis=1), 48000, "WAV"),
        "u8.wav": wav_bytes(tone(0.7), RATE, sample_width=1),
    }
    for name, data in clips.items():
        (media_dir / name).write_bytes(data)
    return clips


@pytest.fixture(scope="module")
def audio_server(tiny_models, media_dir):
    yield from pipeline_server("qwen2-audio", tiny_models["qwen2-audio"], media_dir, "test-tritonserver-audio.log",
                               MMT_MAX_AUDIO_SECONDS="60")


def tokens(server, model: str, inputs: RequestInputs) -> tuple[list[int], list[dict]]:
    responses = list(stream_grpc(server.config.grpc_url, model, inputs, timeout_s=180))
    return [t for r in responses for t in r["token_ids"]], responses


def offline(llm, text: str, waves: list[np.ndarray], max_tokens: int = 24) -> list[int]:
    from vllm import SamplingParams

    parts = [{"type": "audio"}] * len(waves)
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": text}] if parts else text}]
    prompt = {"prompt": llm.get_tokenizer().apply_chat_template(messages, tokenize=False,
                                                                add_generation_prompt=True)}
    if waves:
        prompt["multi_modal_data"] = {"audio": [(w, RATE) for w in waves]}
    out = llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def all_paths_equal(server, llm, text: str, urls: list[str], waves: list[np.ndarray]) -> list[int]:
    want = offline(llm, text, waves)
    for model in PATHS:
        inputs = build_inputs(text, sampling=GREEDY)
        inputs.audio_url = urls or None
        got, responses = tokens(server, model, inputs)
        assert got == want, model
        assert responses[-1]["finish_reason"] in ("stop", "length")
    return want


def test_text_only(audio_server, offline_audio):
    all_paths_equal(audio_server, offline_audio, "Hello there", [], [])


def test_one_clip_data_uri(audio_server, offline_audio, audio_media):
    data = audio_media["one.wav"]
    all_paths_equal(audio_server, offline_audio, "What do you hear?", [data_uri(data)], [decoded(data)])


def test_two_clips(audio_server, offline_audio, audio_media):
    clips = [audio_media["one.wav"], audio_media["short.wav"]]
    all_paths_equal(audio_server, offline_audio, "Compare the two clips.", [data_uri(c) for c in clips],
                    [decoded(c) for c in clips])


def test_clip_by_file_and_http(audio_server, offline_audio, audio_media, media_dir, media_http):
    port = media_http.server_address[1]
    want = decoded(audio_media["one.wav"])
    for url in (f"file://{media_dir / 'one.wav'}", f"http://127.0.0.1:{port}/one.wav"):
        all_paths_equal(audio_server, offline_audio, "Listen.", [url], [want])


@pytest.mark.parametrize("name", ["clip.flac", "clip.ogg", "clip.mp3", "stereo48k.wav", "u8.wav"])
def test_formats(audio_server, offline_audio, audio_media, name):
    data = audio_media[name]
    all_paths_equal(audio_server, offline_audio, "What is it?", [data_uri(data, name.rsplit(".", 1)[1])],
                    [decoded(data)])


def test_input_audio_in_messages(audio_server, offline_audio, audio_media):
    """OpenAI-style input_audio parts, as the OpenAI server sends them, give the same tokens as audio_url."""
    data = audio_media["short.wav"]
    messages = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}},
        {"type": "text", "text": "What do you hear?"}]}]
    want = offline(offline_audio, "What do you hear?", [decoded(data)])
    for model in PATHS:
        got, _ = tokens(audio_server, model, RequestInputs(messages=messages, sampling_parameters=GREEDY,
                                                           stream=True))
        assert got == want, model


def test_decode_used_prefills_kv(audio_server, offline_audio, tiny_models, audio_media):
    """Decode is given zero embeddings for the clip; only prefill saw the real ones. Equal tokens therefore mean
    decode's KV for the audio came from prefill over the connector (several whole 128-token blocks here)."""
    import torch
    from vllm import SamplingParams

    from mmtriton.audio_encoder import Qwen2AudioEncoder

    data = audio_media["one.wav"]
    text = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 30)
    want = all_paths_equal(audio_server, offline_audio, text, [data_uri(data)], [decoded(data)])
    emb = Qwen2AudioEncoder(str(tiny_models["qwen2-audio"])).encode([decoded(data)])[0].embeddings
    prompt = offline_audio.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": text}]}],
        tokenize=False, add_generation_prompt=True)
    zeros = offline_audio.generate({"prompt": prompt, "multi_modal_data": {"audio": [torch.zeros_like(emb)]}},
                                   SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0]
    assert list(zeros.outputs[0].token_ids) != want
    assert len(zeros.prompt_token_ids) > 3 * 128, "several whole 128-token KV blocks"


def _failures(audio_media):
    one = audio_media["one.wav"]
    return [
        (data_uri(b""), "is empty"),
        (data_uri(b"RIFF....WAVEfmt garbage" * 3), "cannot decode audio"),
        (data_uri(one[:30]), "cannot decode audio"),  # cut inside the header (a cut in the samples is a shorter clip)
        (data_uri(wav_bytes(tone(61.0), RATE)), "limit is 60"),
        (data_uri(wav_bytes(tone(0.01), RATE)), "shorter than the model's minimum"),
    ]


def test_audio_failures_name_the_item_on_every_path_and_leak_nothing(audio_server, audio_media):
    good = data_uri(audio_media["short.wav"])
    for url, expect in _failures(audio_media):
        for model in PATHS:
            t0 = time.monotonic()
            with pytest.raises(InferenceFailed) as info:
                tokens(audio_server, model, RequestInputs(text_input="x", audio_url=[good, url],
                                                          sampling_parameters={"max_tokens": 2}, stream=True))
            message = str(info.value)
            assert "audio_url[1]" in message and expect.lower() in message.lower(), (model, expect, message)
            assert "invalid" in message.lower() or "INVALID_ARG" in message, message
            assert time.monotonic() - t0 < 30
    with pytest.raises(InferenceFailed, match="too many media items"):
        tokens(audio_server, "multimodal_bls", RequestInputs(text_input="x", audio_url=[good] * 9, stream=True))
    assert_pool_drained(audio_server, "encoder_audio")
    ok, _ = tokens(audio_server, "multimodal", RequestInputs(text_input="x", audio_url=[good],
                                                             sampling_parameters={"max_tokens": 3}, stream=True))
    assert len(ok) == 3


def test_images_are_refused_by_name_on_an_audio_model(audio_server):
    from conftest import pattern_image, png_bytes

    url = "data:image/png;base64," + base64.b64encode(png_bytes(pattern_image(32, 32, seed=1))).decode()
    for model in PATHS:
        with pytest.raises(InferenceFailed, match="does not take image input"):
            tokens(audio_server, model, RequestInputs(text_input="x", image_url=[url], stream=True))


def test_same_clip_twice_is_decoded_once(audio_server, media_http):
    port = media_http.server_address[1]
    url = f"http://127.0.0.1:{port}/one.wav?twice"
    time.sleep(GAUGE_SETTLE_S)
    hits = metric(audio_server, "mmtriton_media_cache", "hits", "encoder_audio")
    first, _ = tokens(audio_server, "multimodal_bls", RequestInputs(text_input="Again?", audio_url=[url],
                                                                    sampling_parameters=GREEDY, stream=True))
    second, _ = tokens(audio_server, "multimodal_bls", RequestInputs(text_input="Again?", audio_url=[url],
                                                                     sampling_parameters=GREEDY, stream=True))
    assert first == second
    time.sleep(GAUGE_SETTLE_S)
    assert metric(audio_server, "mmtriton_media_cache", "hits", "encoder_audio") == hits + 1
    assert media_http.hits["/one.wav?twice"] == 1


def test_encoder_audio_batches_concurrent_requests(audio_server, offline_audio):
    import threading

    clips = [wav_bytes(tone(0.3 + 0.1 * i), RATE) for i in range(6)]
    want = [offline(offline_audio, "Listen.", [decoded(c)]) for c in clips]
    got: list[list[int] | None] = [None] * len(clips)
    start = threading.Barrier(len(clips))

    def one(i: int) -> None:
        inputs = build_inputs("Listen.", sampling=GREEDY)
        inputs.audio_url = [data_uri(clips[i])]
        start.wait(timeout=60)
        got[i] = tokens(audio_server, "multimodal", inputs)[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(clips))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert got == want
    time.sleep(GAUGE_SETTLE_S)
    assert metric(audio_server, "mmtriton_encoder_batching", "max_requests", "encoder_audio") >= 2


@pytest.fixture(scope="module")
def audio_openai(audio_server):
    from conftest import ROOT, free_port
    from mmtriton.openai_server import OpenAIServerConfig, OpenAIServerProcess

    server = OpenAIServerProcess(OpenAIServerConfig(triton_url=audio_server.config.grpc_url, port=free_port()),
                                 log_file=ROOT / "logs" / "test-openai-server-audio.log")
    server.start()
    try:
        server.wait_ready(timeout_s=120)
        yield server
    finally:
        server.stop()


def test_openai_input_audio_equals_direct_and_refuses_a_too_short_clip(audio_server, audio_openai, audio_media):
    """input_audio through our OpenAI server: the same tokens as Triton direct on every path; a clip too short for
    the model is a 400 naming the part, at once (it used to get no answer at all)."""
    import openai

    client = openai.OpenAI(base_url=audio_openai.base_url, api_key="unused", max_retries=0, timeout=60)

    def messages(data: bytes) -> list[dict]:
        return [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}},
            {"type": "text", "text": "What do you hear?"}]}]

    good = messages(audio_media["short.wav"])
    for model in PATHS:
        want, _ = tokens(audio_server, model, RequestInputs(messages=good, sampling_parameters=GREEDY, stream=True))
        reply = client.chat.completions.create(model=model, messages=good, max_tokens=24, temperature=0,
                                               extra_body={"return_token_ids": True})
        assert reply.choices[0].token_ids == want, model
        t0 = time.monotonic()
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=model, messages=messages(wav_bytes(tone(0.01), RATE)),
                                           max_tokens=4)
        assert time.monotonic() - t0 < 20
        assert "messages[0].content[0]" in str(info.value) and "minimum" in str(info.value), str(info.value)
