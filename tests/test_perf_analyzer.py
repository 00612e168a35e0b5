"""perf_analyzer (installed by bin/setup: tools/install_perf_analyzer.sh) streams text + image requests to
multimodal_agg on the session server, and the benchmark's own summary reads its profile export."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from client import RequestInputs, stream_grpc
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from perf_analyzer_inputs import build_entries, write_input_data  # noqa: E402
from perf_analyzer_run import perf_analyzer_command, profile_summary  # noqa: E402

pytestmark = pytest.mark.integration

MAX_TOKENS = 8


def test_perf_analyzer_streams_multimodal_agg(triton_server, tmp_path):
    inputs = write_input_data(tmp_path / "inputs.json", build_entries([(64, 48)], variants=2, max_tokens=MAX_TOKENS))
    out_csv, profile = tmp_path / "perf.csv", tmp_path / "profile.json"
    # --request-count: one fixed window of 20 requests, so a busy machine cannot fail the stability check.
    cmd = perf_analyzer_command("multimodal_agg", triton_server.config.grpc_url, inputs, out_csv, profile, "1:1",
                                extra=["--request-count", "20"])
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 1 and rows[0]["Concurrency"] == "1", rows
    assert float(rows[0]["Inferences/Second"]) > 0, rows
    # Streaming really happened: one response per generated token (min_tokens = max_tokens), for every request.
    (summary,) = profile_summary(profile)
    assert summary["requests"] >= 20 and summary["responses_per_request"] == MAX_TOKENS, summary
    assert 0 < summary["first_p50"] <= summary["last_p50"], summary


def test_perf_analyzer_streams_video_requests_to_the_ensemble(triton_server, tmp_path):
    """--modality video input data: each entry one H.264 MP4 (data:video/mp4) sampled to 2 frames by its own
    media_io_kwargs, through multimodal (preprocess → encoder_image → NIXL → llm_prefill → llm_decode)."""
    entries = build_entries([(64, 48)], variants=2, max_tokens=MAX_TOKENS, modality="video", seconds=1.0, fps=10,
                            num_frames=2)
    (uri,) = entries[0]["video_url"]["content"]
    assert uri.startswith("data:video/mp4;base64,") and "image_url" not in entries[0]
    inputs = write_input_data(tmp_path / "inputs.json", entries)
    out_csv, profile = tmp_path / "perf.csv", tmp_path / "profile.json"
    cmd = perf_analyzer_command("multimodal", triton_server.config.grpc_url, inputs, out_csv, profile, "1:1",
                                extra=["--request-count", "10"])
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (summary,) = profile_summary(profile)
    assert summary["requests"] >= 10 and summary["responses_per_request"] == MAX_TOKENS, summary
    # The video reached the model: every request's prompt is as long as a direct request with the same video
    # (its frames' tokens included), longer than the same text alone.
    requests = json.loads(profile.read_text())["experiments"][0]["requests"]
    prompt_lengths = {r["response_outputs"][-1]["num_input_tokens"] for r in requests}
    text = entries[0]["text_input"]["content"][0]

    def prompt_length(**media) -> int:
        inputs = RequestInputs(text_input=text, sampling_parameters=json.loads(
            entries[0]["sampling_parameters"]["content"][0]) | {"max_tokens": 1, "min_tokens": 1}, stream=True, **media)
        return list(stream_grpc(triton_server.config.grpc_url, "multimodal", inputs))[-1]["num_input_tokens"]

    with_video = prompt_length(video_url=[uri])
    assert prompt_lengths == {with_video}, (prompt_lengths, with_video)
    assert with_video > prompt_length(), with_video
