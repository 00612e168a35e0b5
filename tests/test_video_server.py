"""Qwen2-VL video through every path on the session's live tritonserver: multimodal_agg (the sampled frames to
vLLM's own processor) and the disaggregated ensemble and BLS (encoder_image's vision tower on the frames with
video_grid_thw → NIXL → llm_prefill with video embeddings → KV connector → llm_decode) give the greedy tokens of
plain vLLM offline given the same frames (our loader on the same bytes, ``SampledVideo.vllm_metadata()``); image +
video in one request in the messages' order; failures name the item on every path and leak nothing.

Small videos only (64x48 to 97x61, at most 2 s, at most 6 frames sampled): the server is shared.
"""

from __future__ import annotations

import base64
import time

import pytest

from client import InferenceFailed, RequestInputs, stream_grpc
from conftest import metric, pattern_image, png_bytes
from mmtriton.media.video import SampledVideo, VideoLimits, decode_video
from mmtriton.settings import Settings
from mmtriton.testing import assert_pool_drained, video_bytes

pytestmark = pytest.mark.integration
PATHS = ("multimodal_agg", "multimodal_bls", "multimodal")
GREEDY = {"max_tokens": 24, "temperature": 0.0}
GAUGE_SETTLE_S = 1.2  # > GaugeExporter's refresh interval
MIME = {"mp4": "video/mp4", "webm": "video/webm", "avi": "video/x-msvideo", "gif": "video/gif"}
# The server's video settings are the defaults (conftest sets none): sample at 2 fps, at most 32 frames.
LIMITS = VideoLimits.from_settings(Settings())


def data_uri(data: bytes, container: str = "mp4") -> str:
    return f"data:{MIME[container]};base64," + base64.b64encode(data).decode()


def sampled(data: bytes, num_frames: int | None = None) -> SampledVideo:
    """The frames the server samples from these bytes (our loader, given to vLLM offline too)."""
    if num_frames is not None:
        return decode_video(data, "reference", LIMITS, num_frames=num_frames)
    return decode_video(data, "reference", LIMITS, fps=LIMITS.default_fps)


@pytest.fixture(scope="module")
def videos(media_dir) -> dict[str, bytes]:
    made = {
        "clip.mp4": video_bytes(64, 48, 2.0, 10, "mp4", seed=1),
        "clip.webm": video_bytes(64, 48, 2.0, 10, "webm", seed=2),
        "clip.avi": video_bytes(64, 48, 2.0, 10, "avi", seed=3),
        "one_frame.mp4": video_bytes(64, 48, frames=1, seed=4),
        "rotated.mp4": video_bytes(64, 48, 1.0, 10, "mp4", seed=5, rotate=90),
        "odd.mp4": video_bytes(75, 49, 1.5, 8, "mp4", seed=6),
        "odd.webm": video_bytes(97, 61, 1.0, 8, "webm", seed=7),
        "other.mp4": video_bytes(80, 60, 1.0, 10, "mp4", seed=8),
    }
    for name, data in made.items():
        (media_dir / name).write_bytes(data)
    return made


def tokens(server, model: str, inputs: RequestInputs) -> tuple[list[int], list[dict]]:
    responses = list(stream_grpc(server.config.grpc_url, model, inputs, timeout_s=180))
    return [t for r in responses for t in r["token_ids"]], responses


def messages(parts: list[tuple[str, str]], text: str) -> list[dict]:
    """One user message: (kind, url) media parts in this order, then the text."""
    content = [{"type": f"{kind}_url", f"{kind}_url": {"url": url}} for kind, url in parts]
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def offline(llm, text: str, media: list[tuple[str, object]], max_tokens: int = 24) -> tuple[list[int], int]:
    """(greedy tokens, prompt length) of plain vLLM given the same frames (and images) in the same order."""
    from vllm import SamplingParams

    parts = [{"type": kind} for kind, _ in media]
    prompt = {"prompt": llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}], tokenize=False,
        add_generation_prompt=True)}
    mm: dict[str, list] = {}
    for kind, value in media:
        mm.setdefault(kind, []).append(
            (value.frames, value.vllm_metadata()) if isinstance(value, SampledVideo) else value)
    if mm:
        prompt["multi_modal_data"] = mm
    out = llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), len(out.prompt_token_ids)


def all_paths_equal(server, llm, text: str, parts: list[tuple[str, str]], media: list[tuple[str, object]],
                    sampling: dict | None = None) -> tuple[list[int], int]:
    want, prompt_len = offline(llm, text, media)
    for model in PATHS:
        got, responses = tokens(server, model, RequestInputs(messages=messages(parts, text),
                                                             sampling_parameters=sampling or GREEDY, stream=True))
        assert got == want, model
        assert responses[-1]["num_input_tokens"] == prompt_len, model
    return want, prompt_len


def test_h264_mp4_as_data_uri(triton_server, offline_vl, videos):
    data = videos["clip.mp4"]
    all_paths_equal(triton_server, offline_vl, "Describe the video.", [("video", data_uri(data))],
                    [("video", sampled(data))])


def test_mp4_over_http_and_by_file(triton_server, offline_vl, videos, media_dir, media_http):
    port = media_http.server_address[1]
    want = [("video", sampled(videos["other.mp4"]))]
    for url in (f"http://127.0.0.1:{port}/other.mp4", f"file://{media_dir / 'other.mp4'}"):
        all_paths_equal(triton_server, offline_vl, "What happens?", [("video", url)], want)


@pytest.mark.parametrize("name", ["clip.webm", "clip.avi", "one_frame.mp4", "rotated.mp4", "odd.mp4", "odd.webm"])
def test_containers_one_frame_rotation_and_odd_sizes(triton_server, offline_vl, videos, name):
    data = videos[name]
    video = sampled(data)
    if name == "rotated.mp4":
        assert video.frames.shape[1:3] == (64, 48) and video.rotation  # the display matrix applied: portrait
    if name == "one_frame.mp4":
        assert video.frames.shape[0] == 1
    container = name.rsplit(".", 1)[1]
    all_paths_equal(triton_server, offline_vl, "What is shown?", [("video", data_uri(data, container))],
                    [("video", video)])


def test_image_and_video_in_one_request_in_the_messages_order(triton_server, offline_vl, videos):
    """Video, image, video (and image, video): each path places them as the messages order them."""
    img = pattern_image(100, 80, seed=1)
    image_url = "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()
    first, second = videos["clip.mp4"], videos["odd.webm"]
    all_paths_equal(triton_server, offline_vl, "Compare them.",
                    [("video", data_uri(first)), ("image", image_url), ("video", data_uri(second, "webm"))],
                    [("video", sampled(first)), ("image", img), ("video", sampled(second))])
    all_paths_equal(triton_server, offline_vl, "Compare them.", [("image", image_url), ("video", data_uri(first))],
                    [("image", img), ("video", sampled(first))])


def test_media_io_kwargs_num_frames_changes_the_sampled_frames_on_every_path(triton_server, offline_vl, videos):
    data = videos["clip.mp4"]
    lengths = []
    for num_frames in (2, 6):
        sampling = {**GREEDY, "media_io_kwargs": {"video": {"num_frames": num_frames}}}
        _, prompt_len = all_paths_equal(triton_server, offline_vl, "Describe.", [("video", data_uri(data))],
                                        [("video", sampled(data, num_frames))], sampling)
        lengths.append(prompt_len)
    # Qwen2-VL merges 2 frames a temporal patch: 2 frames → 1 patch, 6 → 3 (4 tokens each at 64x48).
    assert lengths[1] - lengths[0] == 2 * 4


def test_same_video_twice_is_decoded_once(triton_server, media_http):
    port = media_http.server_address[1]
    url = f"http://127.0.0.1:{port}/clip.mp4?twice"
    time.sleep(GAUGE_SETTLE_S)
    hits = metric(triton_server, "mmtriton_media_cache", "hits", "encoder_image")
    answers = [tokens(triton_server, "multimodal_bls", RequestInputs(
        messages=messages([("video", url)], "Again?"), sampling_parameters=GREEDY, stream=True))[0]
        for _ in range(2)]
    assert answers[0] == answers[1]
    time.sleep(GAUGE_SETTLE_S)
    assert metric(triton_server, "mmtriton_media_cache", "hits", "encoder_image") == hits + 1
    assert media_http.hits["/clip.mp4?twice"] == 1, "the second request must not fetch again"


def test_decode_used_prefills_kv_for_a_video_prompt(triton_server, offline_vl, tiny_models, videos):
    """Decode is given zero embeddings for the video; only prefill saw the real ones. Equal tokens therefore mean
    decode's KV for the video came from prefill over the connector (several whole 128-token blocks here)."""
    import torch
    from vllm import SamplingParams

    from mmtriton.encoder import Qwen2VLImageEncoder

    data = videos["clip.mp4"]
    video = sampled(data)
    text = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 30)
    want, _ = all_paths_equal(triton_server, offline_vl, text, [("video", data_uri(data))], [("video", video)])
    encoded = Qwen2VLImageEncoder(str(tiny_models["qwen2-vl"])).encode_many([video])[0]
    prompt = offline_vl.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}],
        tokenize=False, add_generation_prompt=True)
    grid = torch.tensor([list(encoded.grid_thw)])
    real, zeros = (offline_vl.generate({"prompt": prompt, "multi_modal_data": {"video": {
        "video_embeds": emb, "video_grid_thw": grid}}}, SamplingParams(max_tokens=24, temperature=0),
        use_tqdm=False)[0] for emb in (encoded.embeddings, torch.zeros_like(encoded.embeddings)))
    assert list(real.outputs[0].token_ids) == want, "our tower's embeddings give vLLM's own tokens"
    assert list(zeros.outputs[0].token_ids) != want
    assert len(zeros.prompt_token_ids) > 3 * 128, "several whole 128-token KV blocks"


def _failures(videos) -> list[tuple[str, str]]:
    mp4 = videos["clip.mp4"]
    return [
        (data_uri(b""), "video is empty"),
        (data_uri(bytes(range(256)) * 4), "not a recognised video container"),
        (data_uri(mp4[: len(mp4) // 2]), "truncated or corrupt"),
        (data_uri(video_bytes(64, 48, frame_times=[0.0, 700.0])), "limit is 600 s"),
        (data_uri(video_bytes(40, 30, 1.0, 5, "gif"), "gif"), "GIF is not an allowed video container"),
    ]


def test_video_failures_name_the_item_on_every_path_and_leak_nothing(triton_server, videos):
    # Cumulative since the encoder started: earlier modules' outages (a killed prefill) may have let regions expire.
    expired = metric(triton_server, "mmtriton_embedding_pool", "expired", "encoder_image")
    good = data_uri(videos["one_frame.mp4"])
    for url, expect in _failures(videos):
        for model in PATHS:
            t0 = time.monotonic()
            with pytest.raises(InferenceFailed) as info:
                tokens(triton_server, model, RequestInputs(text_input="x", video_url=[good, url],
                                                           sampling_parameters={"max_tokens": 2}, stream=True))
            message = str(info.value)
            assert "video_url[1]" in message and expect.lower() in message.lower(), (model, expect, message)
            assert "invalid" in message.lower() or "INVALID_ARG" in message, message
            assert time.monotonic() - t0 < 30
    too_many = {"max_tokens": 2, "media_io_kwargs": {"video": {"num_frames": LIMITS.max_frames + 1}}}
    for model in PATHS:
        with pytest.raises(InferenceFailed, match=r"media_io_kwargs\.video\.num_frames=33 exceeds the limit of 32"):
            tokens(triton_server, model, RequestInputs(text_input="x", video_url=[good],
                                                       sampling_parameters=too_many, stream=True))
    # (Up to the ack timeout, 60 s: regions an earlier module's killed prefill never acknowledged are reclaimed then.)
    assert_pool_drained(triton_server, "encoder_image", expired, within_s=75)
    ok, _ = tokens(triton_server, "multimodal", RequestInputs(text_input="x", video_url=[good],
                                                              sampling_parameters={"max_tokens": 3}, stream=True))
    assert len(ok) == 3


def test_openai_video_url_with_media_io_kwargs_equals_triton_direct(triton_server, openai_server, videos):
    """A video_url part and a top-level media_io_kwargs (vLLM's field) through our OpenAI server: the tokens of
    Triton direct with the same sampling_parameters, on every path."""
    import openai

    client = openai.OpenAI(base_url=openai_server.base_url, api_key="unused", max_retries=0, timeout=60)
    chat = messages([("video", data_uri(videos["clip.mp4"]))], "Describe.")
    io_kwargs = {"video": {"num_frames": 2}}
    for model in PATHS:
        want, responses = tokens(triton_server, model, RequestInputs(
            messages=chat, sampling_parameters={**GREEDY, "media_io_kwargs": io_kwargs}, stream=True))
        reply = client.chat.completions.create(model=model, messages=chat, max_tokens=24, temperature=0,
                                               extra_body={"return_token_ids": True, "media_io_kwargs": io_kwargs})
        assert reply.choices[0].token_ids == want, model
        assert reply.usage.prompt_tokens == responses[-1]["num_input_tokens"], model
