"""One source of truth for configuration.

Every setting has a default, can be set by an environment variable ``MMT_<NAME>`` (the launcher sets these
for the server, and the Python-backend stubs inherit them), and a model's ``config.pbtxt`` parameter of the
same lower-case name overrides both for that model. Knows nothing of Triton or vLLM.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "MMT_"


def cache_dir() -> Path:
    """Where built tiny models and other generated files live (never in git)."""
    if os.environ.get("MMT_CACHE_DIR"):
        return Path(os.environ["MMT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmtriton"


def repo_root() -> Path:
    """The checkout this package runs from (src/mmtriton/settings.py → root)."""
    return Path(__file__).resolve().parents[2]


def default_model_path() -> Path:
    return cache_dir() / "tiny" / "qwen2-vl"


@dataclass(frozen=True)
class Settings:
    # The checkpoint every engine serves. Empty means the embedded tiny Qwen2-VL (built on demand).
    model: str = ""
    # Engine dtype; "auto" = the checkpoint's own (float32 for the tiny models), not vLLM's auto (bf16 on CPU).
    dtype: str = "auto"
    max_model_len: int = 4096
    # vLLM's CPU KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE).
    kv_cache_gib: int = 1
    max_num_seqs: int = 16
    # Seconds a model waits for its vLLM engine to start.
    engine_start_timeout_s: float = 600.0
    # What a model does when its vLLM engine dies: "restart" it in the same stub (plain tritonserver: the model
    # stays READY meanwhile, Triton 2.51 lets a Python model say nothing else), or "exit" the stub so the
    # launcher's supervisor reloads the model and Triton's readiness tells the truth (what bin/serve sets).
    engine_on_death: str = "restart"
    # Media policy.
    # Media items (images + audio + video) one request may carry.
    max_media_items: int = 8
    max_media_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_audio_seconds: float = 600.0
    # Video (media/video.py). Sampling defaults: ``video_fps`` frames per second of video (2.0, as Qwen2-VL's
    # processor samples), or exactly ``video_num_frames`` evenly over the stream when > 0; a request may choose
    # either (sampling_parameters.media_io_kwargs.video). Limits, checked before the cost: seconds by the header,
    # frames decoded per video, pixels of one frame (larger frames are resized down, keeping the aspect ratio),
    # and pixels of all sampled frames together after that resize.
    video_fps: float = 2.0
    video_num_frames: int = 0
    video_max_frames: int = 32
    max_video_seconds: float = 600.0
    # Source resolution refused past this (by the header, before decoding).
    max_video_source_pixels: int = 4096 * 4096
    max_video_frame_pixels: int = 640 * 480
    max_video_total_pixels: int = 32 * 640 * 480
    # Directories from which file:// media may be read; empty = file:// refused.
    allowed_local_media_dirs: tuple[str, ...] = field(default_factory=tuple)
    # Request limits.
    max_tokens_limit: int = 4096
    # Remote media (http/https)
    # Loopback / private (RFC 1918, ULA, CGNAT) targets are refused unless allowed; metadata endpoints always are.
    allow_loopback_media_urls: bool = False
    allow_private_media_urls: bool = False
    # Whole fetch (DNS + every redirect hop + body), and each DNS lookup / TCP connect.
    media_fetch_timeout_s: float = 10.0
    media_connect_timeout_s: float = 3.0
    media_max_redirects: int = 3
    # Decoded images kept by MediaLoader (LRU, counted as width * height * 3).
    media_cache_bytes: int = 256 * 1024 * 1024
    # Disaggregated pipeline (encoder → prefill → decode)
    # The encoder's NIXL-registered embedding pool, and how long a region waits for the reader's ack.
    embedding_pool_mib: int = 256
    embedding_ack_timeout_s: float = 60.0
    # Embeddings of recent media items each encoder keeps (LRU by bytes, CPU; a repeated item skips the tower,
    # keyed by the decoded item's content × the encoder's checkpoint and dtype). 0 disables it.
    embedding_cache_mib: int = 256
    # Each stage call (embedding fetch, BLS call to a stage) gives up after this.
    stage_timeout_s: float = 120.0
    # llm_decode: a request with no first token by then fails (its KV cache never came from llm_prefill), and
    # after decode_stalls_to_restart such failures in a row, with no success between, the decode engine is
    # treated as dead and replaced (its KV connector state is then new).
    decode_first_token_timeout_s: float = 30.0
    decode_stalls_to_restart: int = 3
    # The first token is the one llm_prefill sampled: llm_decode sends it the moment the hand-over arrives and
    # decodes on from it (only the prompt's KV moves), instead of computing it again after the KV transfer.
    first_token_from_prefill: bool = True
    # vLLM NixlConnector side channels (host, and one port per engine).
    kv_side_channel_host: str = "127.0.0.1"
    prefill_kv_port: int = 5601
    decode_kv_port: int = 5602
    # CPU cores per engine (VLLM_CPU_OMP_THREADS_BIND, e.g. "0" or "2-5"). Empty: prefill takes the first half
    # of this process's cores and decode the second half; the aggregated engine keeps vLLM's "auto". Engines
    # sharing cores under vLLM's auto binding spin against each other: 24 tokens went from 70 ms to 2.9 s.
    omp_bind_prefill: str = ""
    omp_bind_decode: str = ""

    def model_path(self) -> str:
        return self.model or str(default_model_path())

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Defaults ← ``MMT_*`` environment ← ``overrides`` (e.g. config.pbtxt parameters); empty values skip."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper(), "")
            if overrides and str(overrides.get(f.name, "")).strip():
                raw = str(overrides[f.name])
            if raw.strip():
                values[f.name] = _parse(f, raw.strip())
        return cls(**values)


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return raw.lower() in ("1", "true", "yes", "on")
        if kind.startswith("tuple"):
            # Comma- or colon-separated, like PATH.
            return tuple(p for p in (s.strip() for s in re.split(r"[,:]", raw)) if p)
    except ValueError as exc:
        raise ValueError(f"setting {f.name}: cannot read {raw!r} as {kind}") from exc
    return raw
