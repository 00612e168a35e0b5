"""What splitting the cores costs before any Triton hop: vLLM engines alone, on one core, on vLLM's default
binding and on all cores, then the disaggregated split of two engines without Triton.

The disaggregated pipelines give prefill's engine half the cores and decode's the other half (the split is
forced on this VM: docs/vllm-cpu.md, "the split stays"), while vLLM's own server and ``multimodal_agg`` run one
engine on vLLM's "auto" binding (on x86 it keeps one core for the engine's scheduler process, so on 2 cores the
model computes on one: vllm/utils/ompmultiprocessing.py). This runs the same engine alone (no Triton, no stubs,
no NIXL) in a fresh process per binding and prints, per binding:

- ``image c=8``: whole requests (1 image 100×90, vision tower, prefill, 24 greedy tokens), 8 at a time: req/s;
- ``text c=8``: the decode engine's share of them (a text prompt of the same token count, 24 tokens): req/s and
  the inter-token gap p50 (a decode step with 8 running);
- ``image c=1``: time to first token p50 of whole requests, one at a time.

and the ratios against "auto". A disaggregated path's c=8 req/s cannot pass its decode engine's ``text c=8`` on
its core, whatever the hops cost. (vLLM's server, which adds its HTTP front end, is slower than its engine alone:
bench/pipeline_compare.py measures it.)

Then the split itself without Triton, in one process: each request is the image request for 1 token on an
engine bound to prefill's cores, then the text prompt for 24 tokens on one bound to decode's (placed as the
disaggregated pipelines place them: mmtriton.disagg.core_split), 8 such chains at a time, then one. What the
disaggregated paths lose beyond this is Triton's, the stubs' and the hops' (NIXL, the KV hand-over).

    .venv/bin/python bench/core_split_ceiling.py [--requests 48] [--binds 0 0-1] [--no-chain]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MAX_TOKENS = 24
QUESTION = "Describe the image."


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def new_engine(bind: str, limits: dict[str, int]):
    """An AsyncLLM whose worker computes on ``bind``: its processes are spawned now and inherit the environment."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from mmtriton.engine import engine_args_for
    from mmtriton.settings import Settings

    settings = Settings.load()
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kv_cache_gib)  # as the server sizes it: two must fit
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args_for(settings, limits)))


class Workload:
    """The request shapes: an image request and a text prompt of the same token count."""

    def __init__(self):
        from mmtriton.chat import ChatFormatter
        from mmtriton.families import family_for
        from mmtriton.settings import Settings

        model = Settings.load().model_path()
        self.limits = dict.fromkeys(family_for(model).modalities, 1)
        chat = ChatFormatter(model)
        self.image_prompt = chat.render(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}])
        self.first_text_id = chat.tokenizer("the", add_special_tokens=False)["input_ids"][0]
        self.seeds = itertools.count(1)
        self.text_prompt: dict | None = None

    def image(self) -> dict:  # a new image every time: vLLM's prefix cache keys images by content
        from mmtriton.testing import pattern_image

        return {"prompt": self.image_prompt,
                "multi_modal_data": {"image": pattern_image(100, 90, seed=next(self.seeds))}}

    async def text_like(self, engine) -> None:
        """As many prompt tokens as an image request has (the engine's count, placeholders expanded)."""
        from vllm import SamplingParams

        async for out in engine.generate(self.image(), SamplingParams(max_tokens=1), uuid.uuid4().hex):
            prompt_len = len(out.prompt_token_ids)
        self.text_prompt = {"prompt_token_ids": [self.first_text_id] * prompt_len}

    def text(self) -> dict:
        return self.text_prompt


async def generate(engine, prompt, tokens: int) -> tuple[float, list[float], int]:
    """(start, arrival of each output, tokens generated) of one greedy request of exactly ``tokens`` tokens."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0.0)
    start = time.perf_counter()
    arrivals: list[float] = []
    n = 0
    async for out in engine.generate(prompt, params, uuid.uuid4().hex):
        arrivals.append(time.perf_counter())
        n = len(out.outputs[0].token_ids)
    return start, arrivals, n


async def at_concurrency(one, concurrency: int, total: int, tokens: int) -> dict:
    """``total`` calls of ``one()`` (each one request's (start, arrivals, tokens)), ``concurrency`` at a time."""
    for _ in range(2):  # warm-up
        await one()
    remaining = [total]
    results: list[tuple[float, list[float], int]] = []

    async def worker():
        while remaining[0] > 0:
            remaining[0] -= 1
            results.append(await one())

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    if any(n != tokens for _, _, n in results):
        raise RuntimeError(f"an answer had other than {tokens} tokens")
    gaps = [b - a for _, arr, _ in results for a, b in zip(arr, arr[1:], strict=False)]
    return {"req_s": total / wall, "ttft_ms": 1000 * p50([arr[0] - s for s, arr, _ in results]),
            "gap_ms": 1000 * p50(gaps), "e2e_ms": 1000 * p50([arr[-1] - s for s, arr, _ in results])}


async def measure(bind: str, requests: int) -> dict:
    """One engine on ``bind``: whole image requests at c=8 and c=1, the text prompt at c=8."""
    work = Workload()
    engine = new_engine(bind, work.limits)
    await work.text_like(engine)
    out = {
        "bind": bind,
        "prompt_tokens": len(work.text_prompt["prompt_token_ids"]),
        "image c=8": await at_concurrency(lambda: generate(engine, work.image(), MAX_TOKENS), 8, requests,
                                          MAX_TOKENS),
        "text c=8": await at_concurrency(lambda: generate(engine, work.text(), MAX_TOKENS), 8, requests,
                                         MAX_TOKENS),
        "image c=1": await at_concurrency(lambda: generate(engine, work.image(), MAX_TOKENS), 1,
                                          max(12, requests // 3), MAX_TOKENS),
    }
    engine.shutdown()
    return out


async def measure_chain(prefill_bind: str, decode_bind: str, requests: int) -> dict:
    """The split without Triton: each request is an image request of 1 token on an engine bound to prefill's
    cores, then the text prompt for 24 tokens on one bound to decode's, 8 such chains at a time."""
    work = Workload()
    prefill = new_engine(prefill_bind, work.limits)
    decode = new_engine(decode_bind, work.limits)
    await work.text_like(decode)

    async def chain():
        start, first, _ = await generate(prefill, work.image(), 1)
        _, arrivals, n = await generate(decode, work.text(), MAX_TOKENS)
        return start, first + arrivals[1:], n  # prefill's token is the first; decode's own first is that again

    out = {"prefill_bind": prefill_bind, "decode_bind": decode_bind,
           "chain c=8": await at_concurrency(chain, 8, requests, MAX_TOKENS),
           "chain c=1": await at_concurrency(chain, 1, max(12, requests // 3), MAX_TOKENS)}
    prefill.shutdown()
    decode.shutdown()
    return out


def child(spec: str, requests: int) -> int:
    """``spec``: a core binding, or "chain:<prefill cores>:<decode cores>"."""
    if spec.startswith("chain:"):
        _, prefill_bind, decode_bind = spec.split(":")
        result = asyncio.run(measure_chain(prefill_bind, decode_bind, requests))
    else:
        result = asyncio.run(measure(spec, requests))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def run_child(spec: str, requests: int, what: str) -> dict:
    """A fresh process per measurement: its engines' processes and nothing else of an earlier one."""
    print(f"[core_split_ceiling] {what}: starting (about a minute)...", flush=True)
    proc = subprocess.run([sys.executable, __file__, "--child", spec, "--requests", str(requests)],
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), capture_output=True, text=True,
                          timeout=1200)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{what} failed (rc {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--binds", nargs="+", default=None,
                    help="VLLM_CPU_OMP_THREADS_BIND values; default: the first core, vLLM's auto (what its server "
                         "and multimodal_agg get), all cores we may use")
    ap.add_argument("--no-chain", action="store_true", help="skip the split without Triton (two engines)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.child, args.requests)
    cores = sorted(os.sched_getaffinity(0))
    binds = args.binds or [str(cores[0]), "auto"] + ([f"{cores[0]}-{cores[-1]}"] if len(cores) > 1 else [])
    results = [run_child(b, args.requests, f"one engine bound to cores {b}") for b in binds]
    print(f"\none vLLM engine alone, tiny checkpoint, {MAX_TOKENS} greedy tokens, {args.requests} requests at c=8 "
          f"(prompt {results[0]['prompt_tokens']} tokens)")
    print(f"{'cores':<8} {'image c=8 req/s':>16} {'text c=8 req/s':>15} {'text gap p50':>13} {'image c=1 TTFT':>15}")
    for r in results:
        print(f"{r['bind']:<8} {r['image c=8']['req_s']:>16.1f} {r['text c=8']['req_s']:>15.1f} "
              f"{r['text c=8']['gap_ms']:>10.1f} ms {r['image c=1']['ttft_ms']:>12.1f} ms")
    # The yardstick: vLLM's default binding if measured (on x86 it keeps a core for the engine's scheduler
    # process: vllm/utils/ompmultiprocessing.py), else the last.
    base = next((r for r in results if r["bind"] == "auto"), results[-1])
    split = results[0]
    print(f"\nratios, cores {split['bind']} / cores {base['bind']}:")
    print(f"  image c=8 req/s       {split['image c=8']['req_s'] / base['image c=8']['req_s']:.2f}x")
    print(f"  text c=8 req/s        {split['text c=8']['req_s'] / base['text c=8']['req_s']:.2f}x")
    print(f"  image c=1 TTFT        {split['image c=1']['ttft_ms'] / base['image c=1']['ttft_ms']:.2f}x")
    print(f"  decode's share on cores {split['bind']} (text c=8) / whole requests on cores {base['bind']} "
          f"(image c=8): {split['text c=8']['req_s'] / base['image c=8']['req_s']:.2f}x")
    chain = None
    if not args.no_chain and len(cores) > 1:
        from mmtriton.disagg import core_split

        prefill_cores, decode_cores = core_split()
        chain = run_child(f"chain:{prefill_cores}:{decode_cores}", args.requests,
                          f"the split without Triton (prefill's engine on cores {prefill_cores}, decode's on "
                          f"{decode_cores})")
        c8, c1 = chain["chain c=8"], chain["chain c=1"]
        print(f"\nthe split without Triton: image request (1 token) on cores {prefill_cores}, then the text prompt "
              f"({MAX_TOKENS} tokens) on cores {decode_cores}")
        print(f"  c=8: {c8['req_s']:.1f} req/s ({c8['req_s'] / base['image c=8']['req_s']:.2f}x one engine on "
              f"cores {base['bind']}), gap p50 {c8['gap_ms']:.1f} ms, e2e p50 {c8['e2e_ms']:.0f} ms")
        print(f"  c=1: TTFT p50 {c1['ttft_ms']:.1f} ms ({c1['ttft_ms'] / base['image c=1']['ttft_ms']:.2f}x)")
    print(json.dumps({"results": results, "chain": chain}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
