"""Helpers the tests (tests/conftest.py re-exports them) and the benchmark scripts (bench/) share: test media,
free ports, reading the server's metrics, and a benchmark tritonserver's config.

Plain functions only, no pytest: bench scripts import this without putting tests/ on sys.path.
"""

from __future__ import annotations

import io
import random
import re
import socket
import urllib.request
import wave
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from mmtriton.settings import repo_root

if TYPE_CHECKING:
    from PIL import Image

    from mmtriton.server import ServerConfig

# Every model of the pipeline, in the order the tests' and the benchmarks' servers load them.
PIPELINE_MODELS = ["multimodal_agg", "encoder_image", "encoder_audio", "llm_prefill", "llm_decode", "multimodal_bls",
                   "preprocess", "multimodal"]


class _HasMetricsEndpoint(Protocol):
    """A started server (mmtriton.server.TritonServer) whose config names its metrics port."""

    config: ServerConfig


def pattern_image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic RGB test image: gradients plus seeded noise (so different seeds give different tokens)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 3 + seed) % 256, (y * 5) % 256, ((x + y) * 7) % 256], -1)
    noise = rng.integers(0, 40, size=base.shape)
    return Image.fromarray(((base + noise) % 256).astype(np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(samples: np.ndarray, rate: int, sample_width: int = 2) -> bytes:
    """Mono PCM WAV of ``samples`` (floats in [-1, 1], clipped), by the standard library: 16-bit signed, or
    ``sample_width=1``: 8-bit, which WAV stores unsigned (silence = 128)."""
    clipped = np.clip(samples, -1, 1)
    frames = (clipped * 32767).astype("<i2") if sample_width == 2 else np.round(clipped * 127 + 128).astype(np.uint8)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(sample_width)
        w.setframerate(rate)
        w.writeframes(frames.tobytes())
    return buf.getvalue()


def audio_bytes(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    """``samples`` ([n] or [n, channels]) in a libsndfile format: "WAV", "FLAC", "OGG" (+ "VORBIS"), "MP3"."""
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    """Two sine tones (440 Hz + 1234 Hz), float32."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1234 * t)).astype(np.float32)


# Test video containers → the encoder video_bytes uses for them (all in the wheel's FFmpeg).
VIDEO_CODECS = {"mp4": "libx264", "mkv": "libx264", "webm": "libvpx-vp9", "avi": "mpeg4", "mov": "libx264",
                "gif": "gif"}


def video_frame(width: int, height: int, index: int, seed: int) -> np.ndarray:
    """Frame ``index`` of a deterministic test video: a pattern that moves with the frame index plus seeded
    noise, so frames differ from each other and seeds give different content. uint8 [height, width, 3]."""
    rng = np.random.default_rng([seed, index])
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 4 + index * 9 + seed * 31) % 256, (y * 6 + index * 5) % 256,
                     ((x + y) * 3 + index * 17) % 256], -1)
    return ((base + rng.integers(0, 24, size=base.shape)) % 256).astype(np.uint8)


def video_bytes(width: int = 64, height: int = 48, seconds: float = 2.0, fps: int = 10, container: str = "mp4",
                *, seed: int = 0, codec: str | None = None, rotate: int = 0, gop: int | None = None,
                frame_times: list[float] | None = None, frames: int | None = None) -> bytes:
    """A deterministic test video by PyAV: H.264 MP4 / MKV / MOV, VP9 WebM, MPEG-4 AVI (or an animated GIF, to
    be refused). ``seconds * fps`` frames unless ``frames`` says how many; ``rotate``: a display matrix of that
    many degrees counterclockwise (MP4/MOV/MKV/WebM); ``gop``: frames per keyframe (default 2 s); ``frame_times``:
    each frame's presentation time in seconds, for a variable-frame-rate stream (timestamps in ms). Odd sizes are
    encoded as yuv444p by H.264 (4:2:0 needs even sizes).

    The frames are deterministic, and so are VP9 WebM and MPEG-4 AVI bytes (bitexact muxing); libx264's are not
    always: in a pytest process that had run other tests, about one call in three gave a slightly different
    encoding of the same frames (same options, the first packets equal, later ones a few bytes apart, decoded
    pixels ~2 levels apart on average), even with threads=1 and the YUV conversion done here. Generate once and
    reuse the bytes where a test needs the same bytes twice (cache hits)."""
    from fractions import Fraction

    import av

    count = frames if frames is not None else len(frame_times) if frame_times is not None else round(seconds * fps)
    codec = codec or VIDEO_CODECS[container]
    buf = io.BytesIO()
    # bitexact: no random Matroska UIDs, no version strings that vary.
    with av.open(buf, "w", format={"mkv": "matroska"}.get(container, container),
                 options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(codec, rate=fps)
        if frame_times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        stream.width, stream.height = width, height
        if codec == "gif":
            stream.pix_fmt = "rgb8"
        elif codec == "libx264" and (width % 2 or height % 2):
            stream.pix_fmt = "yuv444p"
        else:
            stream.pix_fmt = "yuv420p"
        if codec != "gif":
            stream.codec_context.gop_size = gop or max(1, 2 * fps)
        if codec == "libx264":
            # The same bytes on every machine, and keyframes only every `gop` frames (no scene-cut ones).
            stream.codec_context.options = {"threads": "1", "x264-params": "scenecut=0", "flags": "+bitexact"}
        if rotate:
            stream.set_display_rotation(rotate)
        for i in range(count):
            frame = _encoder_input(video_frame(width, height, i, seed), stream.pix_fmt)
            if frame_times is not None:
                frame.pts = round(frame_times[i] * 1000)
                frame.time_base = Fraction(1, 1000)
            else:
                frame.pts = i
                frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _encoder_input(rgb: np.ndarray, pix_fmt: str):
    """``rgb`` as the encoder's pixel format, converted here (BT.601 limited range, as FFmpeg's default) rather
    than by swscale inside encode(); odd 4:2:0 sizes and GIF still go through swscale."""
    import av

    if pix_fmt not in ("yuv420p", "yuv444p") or (pix_fmt == "yuv420p" and (rgb.shape[0] % 2 or rgb.shape[1] % 2)):
        return av.VideoFrame.from_ndarray(rgb, format="rgb24")
    r, g, b = (rgb[..., c].astype(np.float64) for c in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255

    def to8(plane: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(plane), 0, 255).astype(np.uint8)

    if pix_fmt == "yuv444p":
        return av.VideoFrame.from_ndarray(np.stack([to8(y), to8(u), to8(v)]), format="yuv444p")
    h, w = y.shape

    def half(plane: np.ndarray) -> np.ndarray:  # 2x2 mean: 4:2:0 chroma
        return to8(plane.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)))

    stacked = np.concatenate([to8(y).reshape(-1), half(u).reshape(-1), half(v).reshape(-1)])
    return av.VideoFrame.from_ndarray(stacked.reshape(h * 3 // 2, w), format="yuv420p")


def audio_only_mp4_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """An MP4 (M4A) with one AAC audio stream and no video: a video container that is not a video."""
    import av

    buf = io.BytesIO()
    wave_ = tone(seconds, rate)
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        for start in range(0, wave_.size, 1024):
            frame = av.AudioFrame.from_ndarray(wave_[None, start:start + 1024], format="flt", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def metrics_text(server: _HasMetricsEndpoint) -> str:
    """The server's whole Prometheus text from its :8002-style metrics endpoint."""
    c = server.config
    with urllib.request.urlopen(f"http://{c.host}:{c.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric_value(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """The one sample of ``name`` in Prometheus ``text`` whose labels include ``labels`` (others may be there);
    ``default`` when there is none and a default is given (our gauges appear only once first set)."""
    samples = re.findall(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M)
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    found = [float(value) for sample_labels, value in samples if all(w in sample_labels.split(",") for w in wanted)]
    if not found and default is not None:
        return default
    if len(found) != 1:
        raise AssertionError(f"{name}{labels}: {len(found)} samples exported, expected 1")
    return found[0]


def metric(server: _HasMetricsEndpoint, name: str, item: str, model: str) -> float:
    """A custom gauge from the server's :8002-style metrics endpoint, by its model and item labels."""
    return metric_value(metrics_text(server), name, item=item, model=model)


def assert_pool_drained(server: _HasMetricsEndpoint, encoder: str, expired_before: float = 0.0,
                        within_s: float = 30.0) -> None:
    """Every region ``encoder`` handed out was acknowledged by prefill or released: its embedding pool is empty
    again within ``within_s``, and its (cumulative) expired count is still ``expired_before``."""
    import time

    deadline = time.monotonic() + within_s
    while metric(server, "mmtriton_embedding_pool", "bytes_in_use", encoder) != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert metric(server, "mmtriton_embedding_pool", "bytes_in_use", encoder) == 0
    assert metric(server, "mmtriton_embedding_pool", "expired", encoder) == expired_before


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free TCP port on 127.0.0.1 below the kernel's ephemeral range, never the same twice in a process. A port
    from bind(0) is an ephemeral one, and an outgoing connection made before the server binds it can take it:
    in CI vLLM's NIXL side channel got "Address already in use" a minute after its port was chosen, and the
    prefill engine never started."""
    low = _ephemeral_low()
    for _ in range(500):
        port = random.randrange(20000, max(low, 20001))
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free TCP port in 20000-{low - 1} on 127.0.0.1")


def bench_server_config(model: str, log_name: str, models: list[str] | None = None) -> ServerConfig:
    """A tritonserver for a benchmark script: free ports (KV side channels too), ``model`` as MMT_MODEL, the
    pipeline's models unless ``models`` says otherwise, its log in logs/``log_name``."""
    from mmtriton.server import ServerConfig

    return ServerConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                        models=PIPELINE_MODELS if models is None else models, log_file=repo_root() / "logs" / log_name,
                        env={"MMT_MODEL": str(model), "MMT_PREFILL_KV_PORT": str(free_port()),
                             "MMT_DECODE_KV_PORT": str(free_port())})
