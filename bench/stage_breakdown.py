"""Where a request's time goes, path by path: time to first token and end-to-end per path (one client, one
request at a time), and per stage from the server's own metrics (Triton's request durations and our
mmtriton_stage_seconds gauges), as the difference between a scrape before and after the run.

    .venv/bin/python bench/stage_breakdown.py [--requests 30] [--paths multimodal_agg multimodal multimodal_bls]
                                              [--url HOST:GRPC_PORT --metrics-url http://HOST:8002/metrics]

Without --url it starts its own tritonserver (every model, the tiny Qwen2-VL). Requests: one 100x80 image,
24 tokens (min_tokens 24), greedy; the first WARMUP requests per path are not counted. Stage times are
averages per request; the gauges refresh every 0.5 s, so a few ms of the last request may be missing.
"""

from __future__ import annotations

import argparse
import base64
import re
import statistics
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client import GrpcStreamClient, build_inputs  # noqa: E402
from mmtriton.server import TritonServer  # noqa: E402
from mmtriton.testing import bench_server_config, pattern_image, png_bytes  # noqa: E402
from mmtriton.tiny_models import ensure_tiny_models  # noqa: E402

WARMUP = 12  # fresh gRPC connections stream their first ~10 answers in a burst (see bench/report.py)
GAUGE_SETTLE_S = 1.2  # > the gauges' refresh interval
STAGE_METRICS = ("mmtriton_stage_seconds", "mmtriton_stage_count", "nv_inference_request_duration_us",
                 "nv_inference_queue_duration_us", "nv_inference_count")
LINE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$", re.M)


def scrape(metrics_url: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    return {(name, labels): float(value) for name, labels, value in LINE.findall(text) if name in STAGE_METRICS}


def label(labels: str, key: str) -> str:
    found = re.search(rf'{key}="([^"]*)"', labels)
    return found.group(1) if found else ""


def run_path(grpc_url: str, model: str, n: int, on_warm) -> tuple[list[float], list[float]]:
    """n timed requests on one connection, after WARMUP untimed ones; ``on_warm()`` runs in between."""
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(pattern_image(100, 80, seed=1))).decode()
    ttft, e2e = [], []
    with GrpcStreamClient(grpc_url) as grpc:
        for i in range(n + WARMUP):
            if i == WARMUP:
                on_warm()
            inputs = build_inputs("Describe the image.",
                                  sampling={"max_tokens": 24, "min_tokens": 24, "temperature": 0})
            inputs.image_url = [uri]
            start = time.perf_counter()
            first = None
            for _ in grpc.generate(model, inputs, timeout_s=120):
                first = first or time.perf_counter()
            if i >= WARMUP:
                ttft.append(first - start)
                e2e.append(time.perf_counter() - start)
    return ttft, e2e


def stage_rows(before: dict, after: dict, n: int) -> list[tuple[str, str, float, float]]:
    """(model, what, ms per request, count per request) for everything that moved during the run."""
    moved = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}
    rows = []
    for (name, labels), delta in moved.items():
        model = label(labels, "model")
        if name == "mmtriton_stage_seconds":
            count = moved.get(("mmtriton_stage_count", labels), 0.0)
            rows.append((model, label(labels, "item"), delta / n * 1e3, count / n))
        elif name in ("nv_inference_request_duration_us", "nv_inference_queue_duration_us"):
            count = sum(v for (m, lab), v in moved.items()
                        if m == "nv_inference_count" and label(lab, "model") == model)
            what = "triton request" if name == "nv_inference_request_duration_us" else "triton queue"
            rows.append((model, what, delta / n / 1e3, count / n))
    return sorted(rows)


@contextmanager
def server_for(args) -> Iterator[tuple[str, str]]:
    if args.url:
        yield args.url, args.metrics_url
        return
    tiny = ensure_tiny_models(progress=True)["qwen2-vl"]
    config = bench_server_config(tiny, "bench-tritonserver.log")
    with TritonServer(config) as server:
        server.wait_ready(900, progress=True)
        yield config.grpc_url, f"http://{config.host}:{config.metrics_port}/metrics"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--paths", nargs="+", default=["multimodal_agg", "multimodal", "multimodal_bls"])
    ap.add_argument("--url", default="", help="a running server's gRPC HOST:PORT (default: start one)")
    ap.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics")
    args = ap.parse_args()
    with server_for(args) as (grpc_url, metrics_url):
        for model in args.paths:
            before: dict = {}

            def warm(model=model, before=before) -> None:
                time.sleep(GAUGE_SETTLE_S)
                before.update(scrape(metrics_url))

            ttft, e2e = run_path(grpc_url, model, args.requests, warm)
            time.sleep(GAUGE_SETTLE_S)
            rows = stage_rows(before, scrape(metrics_url), args.requests)
            print(f"\n{model}: TTFT p50 {statistics.median(ttft) * 1e3:.1f} ms, "
                  f"e2e p50 {statistics.median(e2e) * 1e3:.1f} ms ({args.requests} requests)")
            for stage_model, what, ms, count in rows:
                print(f"  {stage_model:16s} {what:16s} {ms:8.2f} ms/request  ({count:.1f} per request)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
