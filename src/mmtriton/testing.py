"""Helpers the tests (tests/conftest.py re-exports them) and the benchmark scripts (bench/) share: test media,
free ports, reading the server's metrics, and a benchmark tritonserver's config.

Plain functions only, no pytest: bench scripts import this without putting tests/ on sys.path.
"""

from __future__ import annotations

import io
import re
import socket
import time
import urllib.request
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
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


@dataclass
class CancelReport:
    """What :func:`disconnects_cancel` saw: when each client left and when each cancel was counted."""

    left_at: list[float] = field(default_factory=list)  # time.monotonic() of each leave()'s return
    counted_at: list[float] = field(default_factory=list)  # when the model's cancelled counter was seen at +1, +2, …
    cancelled: float = 0.0  # cancels the model counted, from the first leave() to the end of the watch
    finished: float = 0.0  # decode tokens of requests that ran to their end meanwhile (answers for nobody)

    def delays(self) -> list[float]:
        """Seconds from the k-th leave to the k-th counted cancel (cancels match leaves in order)."""
        return [round(c - left, 1) for left, c in zip(self.left_at, self.counted_at, strict=False)]

    def late(self, bound_s: float) -> list[int]:
        """The tries whose cancel was not counted within ``bound_s`` of their leave."""
        return [k for k, left in enumerate(self.left_at)
                if k >= len(self.counted_at) or self.counted_at[k] - left > bound_s]


def disconnects_cancel(server: _HasMetricsEndpoint, leave: Callable[[], None], tries: int, bound_s: float,
                       model: str = "multimodal_agg", poll_s: float = 0.2) -> CancelReport:
    """Run ``leave()`` (a client that starts a long request and goes away) ``tries`` times and watch ``model``'s
    ``mmtriton_engine{item="cancelled"}`` counter until every try's cancel is counted or ``bound_s`` has passed
    since the last leave.

    Tries follow each other after a short wait, not after their cancel: a late cancel (README, Known issues) can
    need the next request to arrive, and it still has to land within ``bound_s`` of its own leave. The decode
    token counter (``mmtriton_stage_count{item="decode"}``, added only when a request ends normally) shows any
    request that ran to its end for nobody."""

    def read() -> tuple[float, float]:
        text = metrics_text(server)
        return (metric_value(text, "mmtriton_engine", item="cancelled", model=model),
                metric_value(text, "mmtriton_stage_count", default=0.0, item="decode", model=model))

    def watch(target: float, until: float) -> None:
        while True:
            cancelled, _ = read()
            now = time.monotonic()
            while len(report.counted_at) < min(cancelled - cancelled_before, tries):
                report.counted_at.append(now)
            if cancelled - cancelled_before >= target or now >= until:
                return
            time.sleep(poll_s)

    cancelled_before, finished_before = read()
    report = CancelReport()
    for k in range(tries):
        leave()
        report.left_at.append(time.monotonic())
        watch(k + 1, time.monotonic() + min(2.0, bound_s))  # the usual cancel lands within ~0.5 s
    watch(tries, report.left_at[-1] + bound_s)
    time.sleep(1.0)  # the gauges refresh every 0.5 s: a cancel counted twice, or one more answer, would show
    cancelled, finished = read()
    report.cancelled, report.finished = cancelled - cancelled_before, finished - finished_before
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_server_config(model: str, log_name: str, models: list[str] | None = None) -> ServerConfig:
    """A tritonserver for a benchmark script: free ports (KV side channels too), ``model`` as MMT_MODEL, the
    pipeline's models unless ``models`` says otherwise, its log in logs/``log_name``."""
    from mmtriton.server import ServerConfig

    return ServerConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                        models=PIPELINE_MODELS if models is None else models, log_file=repo_root() / "logs" / log_name,
                        env={"MMT_MODEL": str(model), "MMT_PREFILL_KV_PORT": str(free_port()),
                             "MMT_DECODE_KV_PORT": str(free_port())})
