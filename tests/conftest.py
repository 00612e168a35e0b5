"""Session fixtures: the tiny models, test media, one live tritonserver, and plain vLLM offline engines."""

from __future__ import annotations

import functools
import http.server
import os
import sys
import threading
import time
from pathlib import Path

import pytest

# Re-exported: test modules import these from conftest; bench scripts import mmtriton.testing directly.
from mmtriton.testing import (  # noqa: F401
    PIPELINE_MODELS,
    bench_server_config,
    free_port,
    metric,
    metric_value,
    metrics_text,
    pattern_image,
    png_bytes,
    tone,
    wav_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the client package

# Engines started by the tests: small KV cache, no usage reporting.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

MAX_MODEL_LEN = 4096  # the server's default (mmtriton.settings); offline engines use the same


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    from mmtriton.tiny_models import ensure_tiny_models

    return ensure_tiny_models(progress=True)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """An allow-listed directory of test media for file:// requests."""
    d = tmp_path_factory.mktemp("media")
    (d / "a.png").write_bytes(png_bytes(pattern_image(100, 80, seed=1)))
    (d / "b.png").write_bytes(png_bytes(pattern_image(120, 70, seed=4)))
    (d / "huge.png").write_bytes(png_bytes(pattern_image(1200, 1000, seed=5)))
    (d / "truncated.png").write_bytes(png_bytes(pattern_image(100, 80, seed=6))[:300])
    pattern_image(40, 30, seed=7).save(d / "anim.gif", format="GIF")
    return d


class _MediaHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path.startswith("/slow"):
            time.sleep(5)
        self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def media_http(media_dir):
    """http://127.0.0.1:<port>/ serving media_dir (the server allows loopback URLs in the tests only)."""
    handler = functools.partial(_MediaHandler, directory=str(media_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.hits = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


# At most one pipeline server runs at a time (each holds three vLLM engines, ~10 GB): starting one stops the
# other. Test modules with their own server (audio, Omni) therefore run after every module that uses the
# session's Qwen2-VL server (pytest_collection_modifyitems below).
_RUNNING_SERVERS: dict[str, object] = {}
OWN_SERVER_MODULES = ("test_audio_server.py", "test_omni_server.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name in OWN_SERVER_MODULES)  # stable: the rest keeps its order


def pipeline_server(name: str, model_dir: Path, media_dir: Path, log_name: str, **env: str):
    """A started, ready tritonserver with every pipeline model on ``model_dir`` (a generator for fixtures)."""
    from mmtriton.server import ServerConfig, TritonServer

    for other in [k for k in _RUNNING_SERVERS if k != name]:
        _RUNNING_SERVERS.pop(other).stop()
    config = ServerConfig(
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        models=PIPELINE_MODELS,
        log_file=ROOT / "logs" / log_name,
        env={
            "MMT_MODEL": str(model_dir),
            "MMT_ALLOWED_LOCAL_MEDIA_DIRS": str(media_dir),
            "MMT_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
            "MMT_ALLOW_LOOPBACK_MEDIA_URLS": "1",
            "MMT_MEDIA_FETCH_TIMEOUT_S": "2",
            "MMT_MAX_IMAGE_PIXELS": str(1024 * 1024),
            "MMT_PREFILL_KV_PORT": str(free_port()),
            "MMT_DECODE_KV_PORT": str(free_port()),
            **env,
        },
    )
    server = TritonServer(config)
    _RUNNING_SERVERS[name] = server
    server.start()
    try:
        server.wait_ready(timeout_s=900)
        yield server
    finally:
        _RUNNING_SERVERS.pop(name, None)
        server.stop()


@pytest.fixture(scope="session")
def triton_server(tiny_models, media_dir):
    """One tritonserver for the whole session: every model, on the tiny Qwen2-VL."""
    yield from pipeline_server("qwen2-vl", tiny_models["qwen2-vl"], media_dir, "test-tritonserver.log")


def _offline_llm(path: Path, limit: dict[str, int]):
    from vllm import LLM

    # enable_mm_embeds: the same engine also takes precomputed embeddings (checked against pixels).
    return LLM(
        str(path), dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN, limit_mm_per_prompt=limit,
        enable_mm_embeds=True, seed=0,
    )


@pytest.fixture(scope="session")
def offline_vl(tiny_models):
    """Plain vLLM offline on the tiny Qwen2-VL: the reference every served path must equal."""
    llm = _offline_llm(tiny_models["qwen2-vl"], {"image": 8, "video": 8})
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def offline_audio(tiny_models):
    llm = _offline_llm(tiny_models["qwen2-audio"], {"audio": 8})
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def openai_server(triton_server):
    """The OpenAI-compatible server (its own process) in front of the session's tritonserver."""
    from mmtriton.openai_server import OpenAIServerConfig, OpenAIServerProcess

    server = OpenAIServerProcess(
        OpenAIServerConfig(triton_url=triton_server.config.grpc_url, port=free_port()),
        log_file=ROOT / "logs" / "test-openai-server.log",
    )
    server.start()
    try:
        server.wait_ready(timeout_s=120)
        yield server
    finally:
        server.stop()
