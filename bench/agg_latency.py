"""One image request (24 greedy tokens) through Triton's multimodal_agg vs the same request in plain vLLM.

Prints server start-to-ready time, then per-path median / p90 latency (and time to first token for the
streamed Triton path), and the ratio Triton / vLLM, all measured in this one run on this machine:

    .venv/bin/python bench/agg_latency.py [--requests 20] [--model PATH]
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

from client import GrpcStreamClient, build_inputs  # noqa: E402
from mmtriton.server import ServerConfig, TritonServer  # noqa: E402
from mmtriton.testing import free_port, pattern_image, png_bytes  # noqa: E402
from mmtriton.tiny_models import ensure_tiny_models  # noqa: E402

PROMPT = "Describe the image."
MAX_TOKENS = 24
WARMUP_STREAM = 12


def summary(name: str, xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(0.9 * len(xs)))]
    return f"{name:<28} median {statistics.median(xs) * 1000:7.1f} ms   p90 {p90 * 1000:7.1f} ms   (n={len(xs)})"


def bench_triton(model: str, image_uri: str, n: int):
    config = ServerConfig(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          models=["multimodal_agg"], env={"MMT_MODEL": model},
                          log_file=ROOT / "logs" / "bench-tritonserver.log")
    server = TritonServer(config)
    server.start()
    try:
        ready_s = server.wait_ready(900)
        inputs = build_inputs(PROMPT, sampling={"max_tokens": MAX_TOKENS, "temperature": 0, "min_tokens": MAX_TOKENS})
        inputs.image_url = [image_uri]
        latencies, ttfts, tokens, whole = [], [], [], []
        with GrpcStreamClient(config.grpc_url) as client:  # one connection, as a real client keeps
            inputs.stream = False
            for i in range(n + 2):
                start = time.perf_counter()
                list(client.generate("multimodal_agg", inputs))
                if i >= 2:
                    whole.append(time.perf_counter() - start)
            inputs.stream = True
            # Streaming needs more warm-up: its first ~10 requests on a connection showed TTFT ≈ end-to-end.
            for i in range(n + WARMUP_STREAM):
                start = time.perf_counter()
                first = None
                ids: list[int] = []
                for r in client.generate("multimodal_agg", inputs):
                    first = first or time.perf_counter()
                    ids += r["token_ids"]
                if i >= WARMUP_STREAM:
                    latencies.append(time.perf_counter() - start)
                    ttfts.append(first - start)
                tokens = ids
        return ready_s, latencies, ttfts, tokens, whole
    finally:
        server.stop()


def bench_vllm(model: str, image, n: int) -> tuple[list[float], list[int]]:
    from vllm import LLM, SamplingParams

    from mmtriton.chat import ChatFormatter

    llm = LLM(model, dtype="float32", enforce_eager=True, max_model_len=4096, max_num_seqs=16,
              limit_mm_per_prompt={"image": 8, "video": 8}, seed=0)
    prompt = {
        "prompt": ChatFormatter(model).render([{"role": "user", "content": [{"type": "image"},
                                                                             {"type": "text", "text": PROMPT}]}]),
        "multi_modal_data": {"image": [image]},
    }
    params = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0)
    latencies, tokens = [], []
    for i in range(n + 2):
        start = time.perf_counter()
        out = llm.generate(prompt, params, use_tqdm=False)
        if i >= 2:
            latencies.append(time.perf_counter() - start)
        tokens = list(out[0].outputs[0].token_ids)
    return latencies, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--model", default="")
    args = parser.parse_args()
    model = args.model or str(ensure_tiny_models(progress=True)["qwen2-vl"])
    image = pattern_image(100, 80, seed=1)
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()

    print(f"model {model}; one {image.size[0]}x{image.size[1]} PNG image, {MAX_TOKENS} greedy tokens", flush=True)
    start_s, t_lat, t_ttft, t_tokens, t_whole = bench_triton(model, uri, args.requests)
    v_lat, v_tokens = bench_vllm(model, image, args.requests)

    print(f"\ntritonserver start → ready (multimodal_agg): {start_s:.1f} s")
    print(summary("Triton multimodal_agg (gRPC)", t_lat))
    print(summary("  time to first token", t_ttft))
    print("  TTFT samples (ms):", " ".join(f"{x * 1000:.0f}" for x in t_ttft))
    print(summary("Triton, stream=false", t_whole))
    print(summary("vLLM offline LLM.generate", v_lat))
    ratio = statistics.median(t_lat) / statistics.median(v_lat)
    print(f"ratio Triton / vLLM offline (median latency): {ratio:.2f}x streamed, "
          f"{statistics.median(t_whole) / statistics.median(v_lat):.2f}x stream=false")
    print(f"token ids identical: {t_tokens == v_tokens}")
    return 0 if t_tokens == v_tokens else 1


if __name__ == "__main__":
    sys.exit(main())
