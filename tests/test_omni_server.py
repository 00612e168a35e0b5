"""Image + audio + video in one request on a live tritonserver serving the tiny Qwen2.5-Omni thinker:
``multimodal_agg`` gives the greedy tokens of plain vLLM offline given the same decoded media, in the order the
client's ``messages`` give; the disaggregated paths refuse Omni media requests with a message that names the path
that serves them (vLLM 0.32 cannot take Omni embeddings: ENVIRONMENT.md, docs/vllm-cpu.md).

This module's server replaces the session's Qwen2-VL one (one pipeline server at a time: conftest runs it last).
"""

from __future__ import annotations

import base64

import numpy as np
import pytest

from client import InferenceFailed, RequestInputs, stream_grpc
from conftest import pipeline_server
from mmtriton.testing import pattern_image, png_bytes, tone, video_bytes, wav_bytes

pytestmark = pytest.mark.integration
GREEDY = {"max_tokens": 24, "temperature": 0.0}
RATE = 16000  # the tiny Omni's feature extractor rate (WhisperFeatureExtractor in its processor config)


@pytest.fixture(scope="module")
def omni_server(tiny_models, media_dir):
    yield from pipeline_server("qwen2.5-omni", tiny_models["qwen2.5-omni"], media_dir, "test-tritonserver-omni.log")


@pytest.fixture(scope="module")
def offline_omni(tiny_models):
    from conftest import _offline_llm

    llm = _offline_llm(tiny_models["qwen2.5-omni"], {"image": 4, "audio": 4, "video": 4})
    yield llm
    llm.llm_engine.engine_core.shutdown()


def uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


class Media:
    """One image, one clip, one video: their bytes, and what the server decodes them to (by our loaders, the
    input vLLM offline is given too)."""

    def __init__(self):
        from mmtriton.media.audio import decode_audio
        from mmtriton.media.image import decode_image
        from mmtriton.media.video import VideoDecoder, VideoLimits
        from mmtriton.settings import Settings

        self.png = png_bytes(pattern_image(100, 80, seed=3))
        self.wav = wav_bytes(tone(1.0), RATE)
        self.mp4 = video_bytes(64, 48, seconds=2.0, fps=10, seed=5)
        self.image = decode_image(self.png, "reference", 1024 * 1024)
        self.wave = decode_audio(self.wav, "reference", RATE, 600.0)
        self.video = VideoDecoder.for_request(VideoLimits.from_settings(Settings()), None, "reference").decode(
            self.mp4, "reference")


@pytest.fixture(scope="module")
def media() -> Media:
    return Media()


def part(kind: str, url: str) -> dict:
    return {"type": f"{kind}_url", f"{kind}_url": {"url": url}}


def offline(llm, order: list[str], media: Media, text: str) -> list[int]:
    from vllm import SamplingParams

    content = [{"type": kind} for kind in order] + [{"type": "text", "text": text}]
    prompt: dict = {"prompt": llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)}
    mm: dict[str, list] = {}
    for kind in order:
        value = {"image": media.image, "audio": (media.wave, RATE),
                 "video": (media.video.frames, media.video.vllm_metadata())}[kind]
        mm.setdefault(kind, []).append(value)
    if mm:
        prompt["multi_modal_data"] = mm
    if "video" in mm:
        # Omni's processor reads the video's frame rate only from here (its time positions).
        prompt["mm_processor_kwargs"] = {"fps": media.video.sampled_fps}
    out = llm.generate(prompt, SamplingParams(**GREEDY), use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def served(server, model: str, order: list[str], media: Media, text: str) -> list[int]:
    urls = {"image": uri(media.png, "image/png"), "audio": uri(media.wav, "audio/wav"),
            "video": uri(media.mp4, "video/mp4")}
    content = [part(kind, urls[kind]) for kind in order] + [{"type": "text", "text": text}]
    inputs = RequestInputs(messages=[{"role": "user", "content": content}], sampling_parameters=GREEDY, stream=True)
    responses = list(stream_grpc(server.config.grpc_url, model, inputs, timeout_s=180))
    assert responses[-1]["finish_reason"] in ("stop", "length"), responses[-1]
    return [t for r in responses for t in r["token_ids"]]


def test_text_only_on_every_path(omni_server, offline_omni, media):
    want = offline(offline_omni, [], media, "Hello there")
    assert want
    for model in ("multimodal_agg", "multimodal_bls", "multimodal"):
        assert served(omni_server, model, [], media, "Hello there") == want, model


@pytest.mark.parametrize("order", [["image", "audio", "video"], ["video", "image", "audio"]])
def test_image_audio_video_in_one_agg_request_equal_offline(omni_server, offline_omni, media, order):
    want = offline(offline_omni, order, media, "Describe all of it.")
    assert served(omni_server, "multimodal_agg", order, media, "Describe all of it.") == want


def test_the_order_of_the_parts_matters(omni_server, media):
    """A control for the test above: the served answer depends on where each item stands in the prompt."""
    one = served(omni_server, "multimodal_agg", ["image", "audio", "video"], media, "Describe all of it.")
    other = served(omni_server, "multimodal_agg", ["video", "audio", "image"], media, "Describe all of it.")
    assert one != other


@pytest.mark.parametrize("model", ["multimodal_bls", "multimodal"])
def test_disaggregated_paths_refuse_omni_media_naming_the_path_that_serves_it(omni_server, media, model):
    with pytest.raises(InferenceFailed) as failed:
        served(omni_server, model, ["image", "audio"], media, "Describe it.")
    message = str(failed.value)
    assert "multimodal_agg" in message and "messages[0].content[0]" in message, message
    assert "INVALID_ARG" in message or "invalid input" in message.lower(), message
    # The server keeps serving: the aggregated path answers right after.
    assert served(omni_server, "multimodal_agg", ["audio"], media, "Listen.")


def test_too_short_clip_is_refused_by_name_on_agg(omni_server, media):
    short = wav_bytes(np.zeros(100, dtype=np.float32), RATE)  # 6 ms: under the 321 samples Omni needs
    inputs = RequestInputs(messages=[{"role": "user", "content": [part("audio", uri(short, "audio/wav")),
                                                                   {"type": "text", "text": "Hm?"}]}],
                           sampling_parameters=GREEDY, stream=True)
    with pytest.raises(InferenceFailed, match=r"messages\[0\]\.content\[0\]"):
        list(stream_grpc(omni_server.config.grpc_url, "multimodal_agg", inputs, timeout_s=60))
