"""An engine that dies (its process killed) is replaced: the model answers UNAVAILABLE meanwhile, then serves
the same tokens again. Runs against the session server."""

from __future__ import annotations

import time

import psutil
import pytest

from client import InferenceFailed, build_inputs, stream_grpc
from conftest import metric

pytestmark = pytest.mark.integration


def engine_core_of(server, model: str) -> psutil.Process:
    root = psutil.Process(server.process.pid)
    for proc in root.children(recursive=True):
        if f"{model}/1/model.py" in " ".join(proc.cmdline()):
            cores = [c for c in proc.children(recursive=True) if "EngineCore" in c.name() + " ".join(c.cmdline())]
            assert cores, f"no EngineCore under {model}'s stub"
            return cores[0]
    raise AssertionError(f"no stub process for {model}")


def test_killed_engine_is_restarted_and_serves_the_same_tokens(triton_server):
    url = triton_server.config.grpc_url
    inputs = build_inputs("Hello there", sampling={"max_tokens": 8, "temperature": 0})
    before = [t for r in stream_grpc(url, "multimodal_agg", inputs) for t in r["token_ids"]]
    restarts = metric(triton_server, "mmtriton_engine", "restarts", "multimodal_agg")

    engine_core_of(triton_server, "multimodal_agg").kill()
    deadline = time.monotonic() + 300
    after, errors = None, []
    while time.monotonic() < deadline:
        try:
            after = [t for r in stream_grpc(url, "multimodal_agg", inputs, timeout_s=120) for t in r["token_ids"]]
            if metric(triton_server, "mmtriton_engine", "restarts", "multimodal_agg") > restarts:
                break
        except InferenceFailed as exc:
            errors.append(str(exc))
        time.sleep(1)
    assert metric(triton_server, "mmtriton_engine", "restarts", "multimodal_agg") == restarts + 1
    assert metric(triton_server, "mmtriton_engine", "alive", "multimodal_agg") == 1
    assert after == before
    # While it was down, requests failed with a clear message instead of hanging.
    assert all("engine" in e for e in errors), errors[:3]
