"""Video loading (media/video.py): the sampler as a pure function, the decoder on generated files (against a
decode of every frame by PyAV), every refusal naming the item and the limit, MediaLoader's cache, and the
request side (sampling_parameters.media_io_kwargs, the OpenAI body). Fast: no engine, ~5 s."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import struct

import numpy as np
import pytest

from mmtriton.media import http_client
from mmtriton.media.loader import MediaLoader
from mmtriton.media.video import (
    SampledVideo,
    VideoDecoder,
    VideoLimits,
    VideoOptions,
    decode_video,
    fit_within,
    sample_indices,
)
from mmtriton.openai_schema import ChatCompletionRequest
from mmtriton.protocol import InvalidInput, MediaItem, parse_sampling_parameters
from mmtriton.settings import Settings
from mmtriton.testing import audio_only_mp4_bytes, pattern_image, png_bytes, tone, video_bytes, wav_bytes

LIMITS = VideoLimits.from_settings(Settings())
WHERE = "messages[0].content[1]"


def all_frames(data: bytes) -> list[np.ndarray]:
    """Every frame PyAV decodes, in presentation order, as RGB: what the sampled frames must be a subset of."""
    import av

    with av.open(io.BytesIO(data)) as container:
        frames = sorted(container.decode(video=0), key=lambda f: f.pts)
        return [f.to_ndarray(format="rgb24") for f in frames]


def refused(data: bytes, limits: VideoLimits = LIMITS, **sampling) -> str:
    with pytest.raises(InvalidInput) as err:
        decode_video(data, WHERE, limits, **(sampling or {"fps": 2.0}))
    message = str(err.value)
    assert message.startswith(WHERE + ": "), message
    return message


def limits(**changes) -> VideoLimits:
    return VideoLimits.from_settings(Settings(**changes))


# ------------------------------------------------------------------------------------------------ the sampler


def test_sampler_by_count_is_even_unique_sorted_and_inside():
    assert sample_indices(0, num_frames=4, max_frames=32) == []
    assert sample_indices(1, num_frames=4, max_frames=32) == [0]
    assert sample_indices(40, num_frames=4, max_frames=32) == [0, 10, 20, 30]  # floor(i * total / n), as Qwen2-VL
    assert sample_indices(5, num_frames=8, max_frames=32) == [0, 1, 2, 3, 4]  # fewer frames than asked
    for total in range(1, 60):
        for n in range(1, 40):
            got = sample_indices(total, num_frames=n, max_frames=64)
            assert got == sorted(set(got)) and len(got) == min(n, total) and got[0] >= 0 and got[-1] < total


def test_sampler_by_fps_counts_seconds_and_caps_at_max_frames():
    # 4 s at 10 fps sampled at 2 fps: 8 frames, every 5th.
    assert sample_indices(40, fps=2.0, stream_fps=10.0, max_frames=32) == [0, 5, 10, 15, 20, 25, 30, 35]
    # 600 s at 30 fps would be 1200 frames at 2 fps: capped at max_frames, spread over the whole video.
    capped = sample_indices(18000, fps=2.0, stream_fps=30.0, max_frames=32)
    assert len(capped) == 32 and capped[0] == 0 and capped[-1] > 17000
    # Shorter than one sampling period: still one frame.
    assert sample_indices(3, fps=0.1, stream_fps=30.0, max_frames=32) == [0]
    # The same by timestamps (constant rate): the same frames.
    times = [i / 10 for i in range(40)]
    assert sample_indices(40, fps=2.0, timestamps=times, max_frames=32) == [0, 5, 10, 15, 20, 25, 30, 35]
    with pytest.raises(ValueError):
        sample_indices(40, fps=2.0, num_frames=4, max_frames=32)


def test_sampler_by_fps_over_variable_frame_rate_timestamps_samples_evenly_in_time():
    # A burst of 30 frames in the first second, then one frame a second for 3 s: by index, half the samples
    # would fall in the burst; by time they fall one per second.
    times = [i / 30 for i in range(30)] + [1.0, 2.0, 3.0]
    assert sample_indices(len(times), fps=1.0, timestamps=times, max_frames=32) == [0, 30, 31, 32]
    by_index = sample_indices(len(times), fps=1.0, stream_fps=len(times) / 4.0, max_frames=32)
    assert by_index == [0, 8, 16, 24]  # what the header's average rate alone would have picked
    # A long gap maps two targets onto one frame: unique all the same.
    gap = [0.0, 0.1, 5.0]
    got = sample_indices(3, fps=2.0, timestamps=gap, max_frames=32)
    assert got == sorted(set(got)) and got[0] == 0 and got[-1] == 2


def test_fit_within_keeps_aspect_and_never_upscales():
    assert fit_within(320, 240, 640 * 480) == (320, 240)
    w, h = fit_within(1920, 1080, 640 * 480)
    assert w * h <= 640 * 480 and abs(w / h - 16 / 9) < 0.01 and w * h > 0.98 * 640 * 480
    assert fit_within(10000, 1, 100) == (100, 1)


# -------------------------------------------------------------------------------------- decoding, formats


@pytest.mark.parametrize("container", ["mp4", "webm", "avi", "mkv", "mov"])
def test_decodes_the_sampled_frames_of_each_container_exactly(container):
    data = video_bytes(64, 48, 2.0, 10, container, seed=5)
    video = decode_video(data, WHERE, LIMITS, num_frames=4)
    reference = all_frames(data)
    assert video.total_frames == len(reference) == 20
    assert video.indices == (0, 5, 10, 15)
    assert video.frames.shape == (4, 48, 64, 3) and video.frames.dtype == np.uint8
    assert video.frames.flags.c_contiguous
    for t, i in enumerate(video.indices):
        np.testing.assert_array_equal(video.frames[t], reference[i])
    assert video.fps == pytest.approx(10.0) and video.duration_s == pytest.approx(2.0, abs=0.01)


def test_seeds_give_different_frames_and_one_seed_the_same_frames():
    for container in ("webm", "avi"):
        assert video_bytes(container=container, seed=1) == video_bytes(container=container, seed=1), container
    a = decode_video(video_bytes(seed=1), WHERE, LIMITS, num_frames=2).frames.astype(int)
    again = decode_video(video_bytes(seed=1), WHERE, LIMITS, num_frames=2).frames.astype(int)
    b = decode_video(video_bytes(seed=2), WHERE, LIMITS, num_frames=2).frames.astype(int)
    assert np.abs(a - again).mean() < 4.0  # libx264's bytes may differ a little from run to run (testing.py)
    assert np.abs(a - b).mean() > 10


def test_only_the_sampled_frames_are_decoded():
    # 30 s at 10 fps, a keyframe every second: 4 frames sampled → at most ~4 GOPs decoded, not 300 frames.
    data = video_bytes(64, 48, 30.0, 10, "mp4", seed=2, gop=10)
    video = decode_video(data, WHERE, LIMITS, num_frames=4)
    assert video.indices == (0, 75, 150, 225)
    assert video.frames_decoded <= 4 * 10 + 4, video.frames_decoded
    reference = all_frames(data)
    for t, i in enumerate(video.indices):
        np.testing.assert_array_equal(video.frames[t], reference[i])
    # One frame: decoding stops after it.
    first = decode_video(data, WHERE, LIMITS, num_frames=1)
    assert first.indices == (0,) and first.frames_decoded <= 2
    # The same indices decoded without seeking (one keyframe for the whole video) cost every frame up to the
    # last sampled one: the figure the seek saves.
    linear = decode_video(video_bytes(64, 48, 30.0, 10, "mp4", seed=2, gop=300), WHERE, LIMITS, num_frames=4)
    assert linear.frames_decoded >= 225


@pytest.mark.parametrize("container", ["mp4", "webm"])
@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_display_rotation_is_applied(container, degrees):
    data = video_bytes(64, 48, 1.0, 4, container, seed=3, rotate=degrees)
    video = decode_video(data, WHERE, LIMITS, num_frames=2)
    turns = (degrees // 90) % 4
    assert video.rotation == turns * 90
    reference = all_frames(data)  # as coded, unrotated
    assert video.frames.shape[1:3] == ((64, 48) if turns % 2 else (48, 64))
    for t, i in enumerate(video.indices):
        np.testing.assert_array_equal(video.frames[t], np.rot90(reference[i], k=turns))


@pytest.mark.parametrize("container", ["mp4", "webm", "avi"])
def test_odd_sizes_and_one_frame_videos(container):
    odd = decode_video(video_bytes(63, 47, 1.0, 10, container, seed=4), WHERE, LIMITS, fps=2.0)
    assert odd.frames.shape == (2, 47, 63, 3)
    one = decode_video(video_bytes(64, 48, container=container, frames=1, seed=4), WHERE, LIMITS, fps=2.0)
    assert one.total_frames == 1 and one.indices == (0,) and one.frames.shape == (1, 48, 64, 3)


def test_frames_over_the_frame_pixel_limit_are_resized_keeping_the_aspect():
    data = video_bytes(320, 240, 1.0, 4, "mp4", seed=6)
    video = decode_video(data, WHERE, limits(max_video_frame_pixels=80 * 60), num_frames=2)
    assert video.frames.shape == (2, 60, 80, 3) and video.source_size == (320, 240)
    # Box (area) filtering of the right frame: close to a plain block average of the decoded frame.
    reference = all_frames(data)[video.indices[1]].reshape(60, 4, 80, 4, 3).mean(axis=(1, 3))
    assert np.abs(video.frames[1].astype(float) - reference).mean() < 2.0


@pytest.mark.parametrize("container", ["mp4", "webm"])
def test_variable_frame_rate_is_sampled_by_timestamps(container):
    times = [i / 30 for i in range(30)] + [1.0, 2.0, 3.0]
    data = video_bytes(64, 48, container=container, frame_times=times, fps=30, seed=7)
    video = decode_video(data, WHERE, LIMITS, fps=1.0)
    assert video.total_frames == 33 and video.indices == (0, 30, 31, 32)
    assert video.timestamps_s == pytest.approx((0.0, 1.0, 2.0, 3.0), abs=0.002)
    reference = all_frames(data)
    for t, i in enumerate(video.indices):
        np.testing.assert_array_equal(video.frames[t], reference[i])


def avi_with_header_frames(data: bytes, frames: int) -> bytes:
    """``data`` (an AVI) whose headers (avih dwTotalFrames, strh dwLength) claim ``frames`` frames."""
    out = bytearray(data)
    struct.pack_into("<I", out, out.find(b"avih") + 8 + 16, frames)
    struct.pack_into("<I", out, out.find(b"strh") + 8 + 32, frames)
    return bytes(out)


@pytest.mark.parametrize("claimed", [0, 7, 33])
def test_wrong_header_frame_counts_are_corrected_by_counting_packets(claimed):
    data = avi_with_header_frames(video_bytes(64, 48, 2.0, 10, "avi", seed=8), claimed)
    video = decode_video(data, WHERE, LIMITS, num_frames=4)
    assert video.header_frames == claimed and video.total_frames == 20
    assert video.indices == (0, 5, 10, 15) and video.duration_s == pytest.approx(2.0)
    # WebM has no frame count at all.
    webm = decode_video(video_bytes(64, 48, 2.0, 10, "webm"), WHERE, LIMITS, num_frames=4)
    assert webm.header_frames == 0 and webm.total_frames == 20


def test_truncated_webm_keeps_the_frames_that_arrived():
    data = video_bytes(64, 48, 4.0, 10, "webm", seed=9)
    video = decode_video(data[: len(data) // 2], WHERE, LIMITS, fps=2.0)
    assert 0 < video.total_frames < 40
    reference = all_frames(data)
    for t, i in enumerate(video.indices):
        np.testing.assert_array_equal(video.frames[t], reference[i])


# ------------------------------------------------------------------------------------------------ refusals


def test_refusals_of_bad_bytes_name_the_item():
    assert "video is empty" in refused(b"")
    assert "not a recognised video container" in refused(b"\x00garbage" * 20)
    assert "GIF is not an allowed video container" in refused(video_bytes(container="gif"))
    assert "PNG image is not an allowed" in refused(png_bytes(pattern_image(16, 16, 1)))
    assert "WAV audio is not an allowed" in refused(wav_bytes(tone(0.2), 16000))
    assert "no video stream found (an audio-only file)" in refused(audio_only_mp4_bytes())
    mp4 = video_bytes(seed=1)
    assert "garbage, truncated or corrupt" in refused(mp4[: len(mp4) // 2])  # its index (moov) is at the end
    assert "garbage, truncated or corrupt" in refused(mp4[:64])
    # Every packet's payload zeroed: frames are there, none decodes.
    avi = bytearray(video_bytes(container="avi"))
    pos, end = avi.find(b"movi"), avi.find(b"idx1")
    while (at := avi.find(b"00dc", pos)) >= 0 and at < end:
        size = struct.unpack_from("<I", avi, at + 4)[0]
        avi[at + 8: at + 8 + size] = bytes(size)
        pos = at + 8 + size
    assert "no decodable frames" in refused(bytes(avi))


def test_limit_refusals_name_the_limit_and_come_before_decoding():
    data = video_bytes(320, 240, 2.0, 10, "mp4")
    message = refused(data, limits(max_video_seconds=1.5))
    assert "2.0 s long by its header, limit is 1.5 s" in message and "not decoded" in message
    # The header claims 10000 s (dwLength): refused by the header, before a packet is read.
    long_avi = avi_with_header_frames(video_bytes(container="avi"), 100_000)
    assert "10000.0 s long by its header, limit is 600 s" in refused(long_avi)
    # The header claims nothing (WebM has durations, but the timestamps count too).
    message = refused(video_bytes(container="webm", seconds=3.0), limits(max_video_seconds=2.5))
    assert "limit is 2.5 s" in message
    message = refused(data, limits(max_video_source_pixels=320 * 200))
    assert "320x240 = 76800 pixels a frame, limit is 64000" in message
    message = refused(data, limits(max_video_total_pixels=3 * 320 * 240), num_frames=4)
    assert "4 frames of 320x240" in message and "limit is 230400" in message
    message = refused(data, limits(video_max_frames=8), num_frames=9)
    assert "too many frames: num_frames=9, limit is 8" in message


def test_video_limits_resolve_sampling_from_request_or_settings():
    assert LIMITS.sampling(None, WHERE) == (None, 2.0)
    assert limits(video_num_frames=6).sampling(None, WHERE) == (6, None)
    assert LIMITS.sampling(VideoOptions(num_frames=4), WHERE) == (4, None)
    assert LIMITS.sampling(VideoOptions(fps=0.5), WHERE) == (None, 0.5)
    with pytest.raises(InvalidInput, match="^" + re.escape(WHERE) + ": set num_frames or fps, not both"):
        LIMITS.sampling(VideoOptions(num_frames=4, fps=1.0), WHERE)
    with pytest.raises(InvalidInput, match=r"limit is 32 \(MMT_VIDEO_MAX_FRAMES\)"):
        LIMITS.sampling(VideoOptions(num_frames=33), WHERE)


def test_settings_read_the_video_environment():
    s = Settings.load(env={"MMT_VIDEO_FPS": "1.5", "MMT_VIDEO_NUM_FRAMES": "8", "MMT_VIDEO_MAX_FRAMES": "16",
                           "MMT_MAX_VIDEO_SECONDS": "60", "MMT_MAX_VIDEO_FRAME_PIXELS": "50176"})
    assert (s.video_fps, s.video_num_frames, s.video_max_frames, s.max_video_seconds,
            s.max_video_frame_pixels) == (1.5, 8, 16, 60.0, 50176)


# ------------------------------------------------------------------------------------- MediaLoader, cache


def test_loader_caches_a_data_uri_per_sampling():
    loader = MediaLoader(Settings())
    uri = "data:video/mp4;base64," + base64.b64encode(video_bytes(seed=11)).decode()
    item = MediaItem("video", uri, "video_url[0]")

    async def main() -> list[SampledVideo]:
        try:
            return [await loader.load_video(item, VideoOptions(num_frames=4)),
                    await loader.load_video(item, VideoOptions(num_frames=4)),
                    await loader.load_video(item, VideoOptions(num_frames=2))]
        finally:
            await http_client.close()

    first, again, other = asyncio.run(main())
    assert again is first and first.frames.shape[0] == 4 and other.frames.shape[0] == 2
    stats = loader.stats()
    assert stats["hits"] == 1 and stats["misses"] == 2 and stats["bytes"] == first.frames.nbytes + other.frames.nbytes


def test_loader_refusals_name_the_item():
    loader = MediaLoader(Settings())
    gif = MediaItem("video", "data:video/gif;base64," + base64.b64encode(video_bytes(container="gif")).decode(),
                    "video_url[1]")
    with pytest.raises(InvalidInput, match=r"^video_url\[1\]: GIF is not an allowed video container"):
        asyncio.run(loader.load_video(gif))
    with pytest.raises(InvalidInput, match=r"^video_url\[1\]: set num_frames or fps, not both"):
        asyncio.run(loader.load_video(gif, VideoOptions(num_frames=2, fps=1.0)))


def test_decoder_cache_key_tells_samplings_and_limits_apart():
    keys = {VideoDecoder(LIMITS, 4).cache_key("sha256:x"), VideoDecoder(LIMITS, 8).cache_key("sha256:x"),
            VideoDecoder(LIMITS, None, 2.0).cache_key("sha256:x"),
            VideoDecoder(limits(max_video_frame_pixels=1000), 4).cache_key("sha256:x")}
    assert len(keys) == 4


def test_vllm_metadata_says_the_frames_are_already_sampled():
    video = decode_video(video_bytes(64, 48, 4.0, 10, "mp4"), WHERE, LIMITS, num_frames=4)
    assert video.vllm_metadata() == {"total_num_frames": 40, "fps": 10.0, "duration": pytest.approx(4.0),
                                     "video_backend": "mmtriton-pyav", "frames_indices": [0, 10, 20, 30],
                                     "do_sample_frames": False}


# ----------------------------------------------------------------------------------------- request side


def test_sampling_parameters_take_media_io_kwargs_video():
    settings = Settings()
    options = parse_sampling_parameters(json.dumps({"max_tokens": 8, "media_io_kwargs": {"video": {"num_frames": 4}}}),
                                        settings)
    assert options.media_io_kwargs is not None and options.media_io_kwargs.video == VideoOptions(num_frames=4)
    by_rate = parse_sampling_parameters('{"media_io_kwargs": {"video": {"fps": 1.0}}}', settings)
    assert by_rate.media_io_kwargs is not None and by_rate.media_io_kwargs.video == VideoOptions(fps=1.0)
    for bad, says in (
        ({"video": {"num_frames": 4, "fps": 1.0}}, "set num_frames or fps, not both"),
        ({"video": {"num_frames": 33}}, "num_frames=33 exceeds the limit of 32 frames"),
        ({"video": {"num_frames": 0}}, "num_frames"),
        ({"video": {"fps": -1}}, "fps"),
        ({"video": {"frames": 4}}, "frames"),
        ({"image": {"size": 4}}, "image"),
    ):
        with pytest.raises(InvalidInput, match="sampling_parameters") as err:
            parse_sampling_parameters(json.dumps({"media_io_kwargs": bad}), settings)
        assert says in str(err.value)


def test_openai_body_passes_media_io_kwargs_through():
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                 media_io_kwargs={"video": {"num_frames": 4}})
    params = body.sampling_parameters(16)
    assert params["media_io_kwargs"] == {"video": {"num_frames": 4}}
    assert parse_sampling_parameters(json.dumps(params), Settings()).media_io_kwargs.video.num_frames == 4
    assert "media_io_kwargs" not in ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}]
                                                          ).sampling_parameters(16)
