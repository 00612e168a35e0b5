"""The first token from prefill (MMT_FIRST_TOKEN_FROM_PREFILL): time to first token of the disaggregated paths
against multimodal_agg's on the same server, with the setting off and on (one tritonserver each, one after the
other), at concurrency 1.

    .venv/bin/python bench/first_token.py [--rounds 40] [--tokens 24] [--settings 0 1]

Each round sends one request to each path in turn (1 image 100×80, greedy, streamed, the sync gRPC client on
one connection per path), so the paths share the machine's moments; per setting it prints TTFT and end-to-end
p50/p90 per path, and each disaggregated path's TTFT minus agg's in the same round (p50/p90 of the paired
differences: the issue's target is ≤ +5 ms). Tokens must be the same on every path and setting, or it says so
and exits 1. Run it under ``flock /tmp/h/heavy.lock`` on a shared machine (~4 min on 2 cores).
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client import GrpcStreamClient, build_inputs  # noqa: E402
from mmtriton.server import TritonServer  # noqa: E402
from mmtriton.testing import bench_server_config, pattern_image, png_bytes  # noqa: E402
from mmtriton.tiny_models import ensure_tiny_models  # noqa: E402

PATHS = ("multimodal_agg", "multimodal", "multimodal_bls")
WARMUP = 4


def one(client: GrpcStreamClient, model: str, uri: str, tokens: int) -> tuple[float, float, list[int]]:
    inputs = build_inputs("Describe the image.", sampling={"max_tokens": tokens, "min_tokens": tokens,
                                                           "temperature": 0})
    inputs.image_url = [uri]
    start = time.perf_counter()
    first, got = None, []
    for response in client.generate(model, inputs, timeout_s=120):
        first = first or time.perf_counter()
        got += response["token_ids"]
    return first - start, time.perf_counter() - start, got


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1e3


def run_setting(setting: str, rounds: int, tokens: int, uri: str) -> tuple[dict[str, dict[str, list[float]]], dict]:
    config = bench_server_config(ensure_tiny_models(progress=True)["qwen2-vl"], "bench-tritonserver-first-token.log")
    config.env["MMT_FIRST_TOKEN_FROM_PREFILL"] = setting
    times: dict[str, dict[str, list[float]]] = {p: {"ttft": [], "e2e": []} for p in PATHS}
    answers: dict[str, list[int]] = {}
    with TritonServer(config) as server:
        server.wait_ready(900, progress=True)
        clients = {p: GrpcStreamClient(config.grpc_url) for p in PATHS}
        try:
            for p in PATHS:
                for _ in range(WARMUP):
                    one(clients[p], p, uri, tokens)
            for r in range(rounds):
                for p in PATHS:
                    ttft, e2e, got = one(clients[p], p, uri, tokens)
                    times[p]["ttft"].append(ttft)
                    times[p]["e2e"].append(e2e)
                    answers.setdefault(p, got)
                    if got != answers[p]:
                        answers[p + " (changed)"] = got
                print(f"\r  MMT_FIRST_TOKEN_FROM_PREFILL={setting}: round {r + 1}/{rounds}", end="", flush=True)
            print()
        finally:
            for c in clients.values():
                c.close()
    return times, answers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--settings", nargs="+", default=["0", "1"])
    args = ap.parse_args()
    (ROOT / "logs").mkdir(exist_ok=True)
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(pattern_image(100, 80, seed=1))).decode()
    results, all_answers = {}, {}
    for setting in args.settings:
        results[setting], answers = run_setting(setting, args.rounds, args.tokens, uri)
        all_answers.update({f"{p} @{setting}": a for p, a in answers.items()})
    print(f"\n1 image 100×80, {args.tokens} tokens, c=1, sync gRPC, {args.rounds} rounds; ms")
    print(f"{'setting':8} {'path':15} {'TTFT p50':>9} {'TTFT p90':>9} {'e2e p50':>8} {'−agg p50':>9} {'−agg p90':>9}")
    for setting, times in results.items():
        agg = times["multimodal_agg"]["ttft"]
        for p in PATHS:
            t = times[p]
            diffs = [a - b for a, b in zip(t["ttft"], agg, strict=True)]
            extra = "" if p == "multimodal_agg" else f" {pct(diffs, 0.5):9.1f} {pct(diffs, 0.9):9.1f}"
            print(f"{setting:8} {p:15} {pct(t['ttft'], 0.5):9.1f} {pct(t['ttft'], 0.9):9.1f} "
                  f"{pct(t['e2e'], 0.5):8.1f}{extra}")
    distinct = {tuple(a) for a in all_answers.values()}
    if len(distinct) != 1:
        print(f"TOKENS DIFFER: {all_answers}")
        return 1
    print("tokens identical on every path and setting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
