"""The encoders' embedding cache: a repeated image vs a new one, per path — time to first token (client side)
and the encoder's own time per request (Triton's compute time of encoder_image and our mmtriton_stage_seconds
stages: image_load, embedding_lookup, encode, embedding_put), from metric scrapes around each phase.

    .venv/bin/python bench/embedding_cache.py [--requests 20] [--sizes 100x80 1024x1024]
                                              [--paths multimodal multimodal_bls]
                                              [--url HOST:GRPC_PORT --metrics-url http://HOST:8002/metrics]

Without --url it starts its own tritonserver (every model, the tiny Qwen2-VL; run it under
``flock /tmp/h/heavy.lock``). Per path and size: WARMUP untimed requests, then ``--requests`` images never sent
before (misses: decoded, hashed, encoded), then the same images again in the same order (hits: the decoded-media
cache and the embedding cache answer; the hit is still copied into a fresh pool region and READ by prefill);
stage times are per phase. Then TTFT once more, interleaved: a new image, then the same again, ``--requests``
times. 16 tokens, greedy. A hit skips the decode too (the decoded-media cache), so the miss/hit gap is decode + tower;
each stage is listed on its own.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from stage_breakdown import GAUGE_SETTLE_S, WARMUP, scrape, server_for, stage_rows  # noqa: E402

from client import GrpcStreamClient, build_inputs  # noqa: E402
from mmtriton.testing import pattern_image, png_bytes  # noqa: E402

ENCODER = "encoder_image"
ENCODER_STAGES = ("image_load", "embedding_lookup", "encode", "embedding_put")


def image_uri(width: int, height: int, seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(pattern_image(width, height, seed))).decode()


def ttft(grpc: GrpcStreamClient, model: str, uri: str) -> float:
    inputs = build_inputs("Describe the image.", sampling={"max_tokens": 16, "min_tokens": 16, "temperature": 0})
    inputs.image_url = [uri]
    start = time.perf_counter()
    first = None
    for _ in grpc.generate(model, inputs, timeout_s=120):
        first = first or time.perf_counter()
    return first - start


def phase(grpc, model: str, uris: list[str], metrics_url: str) -> tuple[list[float], dict[str, float]]:
    """TTFT of each request, and the encoder's ms per request by stage over the phase."""
    time.sleep(GAUGE_SETTLE_S)
    before = scrape(metrics_url)
    times = [ttft(grpc, model, uri) for uri in uris]
    time.sleep(GAUGE_SETTLE_S)
    stages = {what: ms for stage_model, what, ms, _count in stage_rows(before, scrape(metrics_url), len(uris))
              if stage_model == ENCODER}
    return times, stages


def p50_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--sizes", nargs="+", default=["100x80", "1024x1024"])
    ap.add_argument("--paths", nargs="+", default=["multimodal", "multimodal_bls"])
    ap.add_argument("--url", default="", help="a running server's gRPC HOST:PORT (default: start one)")
    ap.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics")
    args = ap.parse_args()
    seed = 10_000  # every miss image is one no earlier request sent
    with server_for(args) as (grpc_url, metrics_url), GrpcStreamClient(grpc_url) as grpc:
        for model in args.paths:
            for _ in range(WARMUP):
                ttft(grpc, model, image_uri(100, 80, seed=1))
            for size in args.sizes:
                width, height = (int(v) for v in size.split("x"))
                uris = [image_uri(width, height, seed := seed + 1) for _ in range(args.requests)]
                miss_ttft, miss_stages = phase(grpc, model, uris, metrics_url)
                hit_ttft, hit_stages = phase(grpc, model, uris, metrics_url)
                # TTFT again, interleaved (a new image, then it again): neither kind gets the other's moment.
                fresh = [image_uri(width, height, seed := seed + 1) for _ in range(args.requests)]
                pairs = [(ttft(grpc, model, uri), ttft(grpc, model, uri)) for uri in fresh]
                new_ttft, again_ttft = [new for new, _ in pairs], [again for _, again in pairs]
                print(f"\n{model} {size} ({args.requests} requests each)")
                print(f"  TTFT p50 phases:      miss {p50_ms(miss_ttft):7.1f} ms, hit {p50_ms(hit_ttft):7.1f} ms "
                      f"(hit/miss {p50_ms(hit_ttft) / p50_ms(miss_ttft):.2f})")
                print(f"  TTFT p50 interleaved: miss {p50_ms(new_ttft):7.1f} ms, hit {p50_ms(again_ttft):7.1f} ms "
                      f"(hit/miss {p50_ms(again_ttft) / p50_ms(new_ttft):.2f})")
                print(f"  {ENCODER} ms/request       miss      hit")
                for what in ("triton request", *ENCODER_STAGES):
                    print(f"  {what:20s} {miss_stages.get(what, 0.0):8.2f} {hit_stages.get(what, 0.0):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
