"""What the OpenAI-compatible server adds per request: the same request through mmtriton.openai_server (openai
SDK, streamed SSE) and straight to Triton (gRPC stream), one after the other, same servers, same run.

Prints median / p90 time to first token and end-to-end latency per path, and the difference (ms added by the
OpenAI server) for the streamed and the non-streamed form:

    .venv/bin/python bench/openai_overhead.py [--requests 30] [--model-name multimodal_agg] [--model PATH]
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

from client import GrpcStreamClient, RequestInputs, chat_messages  # noqa: E402
from mmtriton.openai_server import OpenAIServerConfig, OpenAIServerProcess  # noqa: E402
from mmtriton.server import ServerConfig, TritonServer  # noqa: E402
from mmtriton.testing import free_port, pattern_image, png_bytes  # noqa: E402
from mmtriton.tiny_models import ensure_tiny_models  # noqa: E402

MAX_TOKENS = 24
WARMUP = 12  # streamed requests on a fresh connection showed TTFT ≈ end-to-end for the first ~10


def stats(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs) * 1000, xs[min(len(xs) - 1, int(0.9 * len(xs)))] * 1000


def timed(responses) -> tuple[float, float, list[int]]:
    """(ttft_s, e2e_s, token ids) of one request, given its lazily-started response iterator factory."""
    start = time.perf_counter()
    first = None
    ids: list[int] = []
    for r in responses():
        first = first or time.perf_counter()
        ids += r
    return first - start, time.perf_counter() - start, ids


def run(n: int, send) -> tuple[list[float], list[float], list[int]]:
    ttft, e2e, ids = [], [], []
    for i in range(n + WARMUP):
        t, e, ids = timed(send)
        if i >= WARMUP:
            ttft.append(t)
            e2e.append(e)
    return ttft, e2e, ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--model-name", default="multimodal_agg", help="Triton model to send to")
    parser.add_argument("--model", default="", help="checkpoint directory (default: the tiny Qwen2-VL)")
    args = parser.parse_args()
    import openai

    checkpoint = args.model or str(ensure_tiny_models(progress=True)["qwen2-vl"])
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(pattern_image(100, 80, seed=1))).decode()
    messages = chat_messages("Describe the image.", [uri])
    sampling = {"max_tokens": MAX_TOKENS, "min_tokens": MAX_TOKENS, "temperature": 0}
    models = ["multimodal_agg"] if args.model_name == "multimodal_agg" else None
    config = ServerConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), models=models,
                          env={"MMT_MODEL": checkpoint}, log_file=ROOT / "logs" / "bench-tritonserver.log")
    rows = []
    with TritonServer(config) as server:
        server.wait_ready(900, progress=True)
        front = OpenAIServerProcess(OpenAIServerConfig(triton_url=config.grpc_url, port=free_port()),
                                    log_file=ROOT / "logs" / "bench-openai-server.log")
        front.start()
        try:
            front.wait_ready(120)
            sdk = openai.OpenAI(base_url=front.base_url, api_key="unused", max_retries=0)
            with GrpcStreamClient(config.grpc_url) as grpc:
                for stream in (True, False):
                    inputs = RequestInputs(messages=messages, sampling_parameters=sampling, stream=stream)

                    def direct():
                        return (r["token_ids"] for r in grpc.generate(args.model_name, inputs))  # noqa: B023

                    def via_openai():
                        kwargs = dict(model=args.model_name, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"return_token_ids": True, "min_tokens": MAX_TOKENS})
                        if not stream:  # noqa: B023
                            return iter([sdk.chat.completions.create(**kwargs).choices[0].token_ids])
                        chunks = sdk.chat.completions.create(**kwargs, stream=True)
                        # The role chunk carries no tokens (and no token_ids field).
                        return (ids for c in chunks if c.choices
                                and (ids := getattr(c.choices[0], "token_ids", None)))

                    d = run(args.requests, direct)
                    o = run(args.requests, via_openai)
                    rows.append((stream, d, o))
        finally:
            front.stop()

    print(f"\n{args.model_name}: one 100x80 image, {MAX_TOKENS} greedy tokens, {args.requests} requests per row "
          "(after warm-up), one connection per path")
    print(f"{'form':<10} {'path':<16} {'TTFT med':>9} {'e2e med':>9} {'e2e p90':>9}")
    same = True
    for stream, d, o in rows:
        form = "stream" if stream else "whole"
        for name, (ttft, e2e, _ids) in (("Triton gRPC", d), ("OpenAI server", o)):
            t_med = f"{stats(ttft)[0]:9.1f}" if stream else f"{'-':>9}"
            print(f"{form:<10} {name:<16} {t_med} {stats(e2e)[0]:9.1f} {stats(e2e)[1]:9.1f}")
        added = stats(o[1])[0] - stats(d[1])[0]
        print(f"{form:<10} added by the OpenAI server: {added:+.1f} ms per request "
              f"({stats(o[1])[0] / stats(d[1])[0]:.2f}x)")
        same &= d[2] == o[2]
    print(f"token ids identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
