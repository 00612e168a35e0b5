"""When do streamed responses arrive? Per front door and client kind: the first token's time, the gaps between
token responses (p50 / p90) and how many streams were late (their first token came after half the answer's time:
a burst at the end), next to the engine's own step time (from the per-token gaps of the sync gRPC client).

Front doors: Triton gRPC with the sync ``tritonclient.grpc`` stream and with ``tritonclient.grpc.aio``, Triton
HTTP ``generate_stream`` (SSE), and our OpenAI server's SSE stream. Where tritonserver runs for the CPU scheduler
decides whether they stream (docs/streaming.md): ``--sessions`` compares placements in one run.

    .venv/bin/python bench/stream_timing.py                       # starts its own servers (tiny Qwen2-VL)
    .venv/bin/python bench/stream_timing.py --sessions own:0 caller own:5   # the same, once per placement
    .venv/bin/python bench/stream_timing.py --grpc 127.0.0.1:8001 --http 127.0.0.1:8000 --openai 127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client import RequestInputs, stream_grpc  # noqa: E402
from client import _grpc_inputs as grpc_inputs  # noqa: E402
from client import _http_body as http_body  # noqa: E402

PROMPT = "Tell me a long story."


def inputs(max_tokens: int) -> RequestInputs:
    return RequestInputs(messages=[{"role": "user", "content": PROMPT}], stream=True,
                         sampling_parameters={"max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0})


def arrivals_grpc_sync(grpc_url: str, model: str, max_tokens: int) -> list[float]:
    t0 = time.perf_counter()
    return [time.perf_counter() - t0 for r in stream_grpc(grpc_url, model, inputs(max_tokens)) if r["token_ids"]]


def arrivals_grpc_aio(grpc_url: str, model: str, max_tokens: int) -> list[float]:
    import tritonclient.grpc.aio as grpcaio

    async def run() -> list[float]:
        client = grpcaio.InferenceServerClient(grpc_url)
        tensors = []
        for t in grpc_inputs(inputs(max_tokens)):  # same tensors, aio types
            a = grpcaio.InferInput(t.name(), t.shape(), t.datatype())
            a._raw_content = t._raw_content
            tensors.append(a)
        done = asyncio.Event()

        async def one():
            yield {"model_name": model, "inputs": tensors, "request_id": "timing"}
            await done.wait()

        times = []
        t0 = time.perf_counter()
        try:
            async for result, error in client.stream_infer(one(), stream_timeout=120):
                if error is not None:
                    raise RuntimeError(error)
                ids = result.as_numpy("token_ids")
                if ids is not None and ids.size:
                    times.append(time.perf_counter() - t0)
                if result.as_numpy("finish_reason") is not None and result.as_numpy("finish_reason")[0]:
                    break
        finally:
            done.set()
            await client.close()
        return times

    return asyncio.run(run())


def raise_for_stream_error(response) -> None:
    """A refused stream (an unknown or unready model, a bad request) is an error with its body, not 0 tokens."""
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:500]}")


def arrivals_http(http_url: str, model: str, max_tokens: int) -> list[float]:
    import httpx

    times = []
    with httpx.Client(timeout=120) as http:  # made before the clock starts: building one takes ~40 ms (TLS context)
        t0 = time.perf_counter()
        with http.stream("POST", f"http://{http_url}/v2/models/{model}/generate_stream",
                         content=http_body(inputs(max_tokens), True),
                         headers={"Content-Type": "application/json"}) as r:
            raise_for_stream_error(r)
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(f"{model}: {event['error']}")
                if event.get("token_ids"):
                    times.append(time.perf_counter() - t0)
    return times


def arrivals_openai(openai_url: str, model: str, max_tokens: int) -> list[float]:
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0}
    times = []
    with httpx.Client(timeout=120) as http:  # made before the clock starts, as above
        t0 = time.perf_counter()
        with http.stream("POST", f"http://{openai_url}/v1/chat/completions", json=body) as r:
            raise_for_stream_error(r)
            for line in r.iter_lines():
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RuntimeError(f"{model}: {chunk['error']}")
                if any("role" not in c["delta"] for c in chunk["choices"]):
                    # One chunk per token (its text may be empty until a character is complete); the role chunk
                    # that opens the stream carries none.
                    times.append(time.perf_counter() - t0)
    return times


def summarize(streams: list[list[float]]) -> dict[str, float]:
    firsts = [s[0] for s in streams]
    lasts = [s[-1] for s in streams]
    gaps = sorted(b - a for s in streams for a, b in zip(s, s[1:], strict=False))
    # Late: the first token came after half the answer's time (what tests/test_stream_timing.py refuses).
    late = sum(1 for s in streams if s[0] > s[-1] / 2)

    def q(values: list[float], p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")

    return {"first_ms": statistics.median(firsts) * 1e3, "last_ms": statistics.median(lasts) * 1e3,
            "gap_p50_ms": q(gaps, 0.5) * 1e3, "gap_p90_ms": q(gaps, 0.9) * 1e3,
            "first_over_last": statistics.median(f / la for f, la in zip(firsts, lasts, strict=True)),
            "late_first": late, "streams": len(streams)}


PATHS = ["multimodal_agg", "multimodal", "multimodal_bls"]
MAX_TOKENS = 64


def client_kinds(grpc_url: str, http_url: str, openai_url: str | None) -> dict[str, Callable[[str, int], list[float]]]:
    """Each client kind: (model, max_tokens) → the arrival times of one streamed answer's responses."""
    kinds = {"grpc-sync": lambda m, n: arrivals_grpc_sync(grpc_url, m, n),
             "grpc-aio": lambda m, n: arrivals_grpc_aio(grpc_url, m, n),
             "http-sse": lambda m, n: arrivals_http(http_url, m, n)}
    if openai_url:
        kinds["openai-sse"] = lambda m, n: arrivals_openai(openai_url, m, n)
    return kinds


def measure(kinds: dict[str, Callable[[str, int], list[float]]], models: list[str], rounds: int,
            max_tokens: int) -> dict[tuple[str, str], dict[str, float]]:
    for model in models:  # warm every connection kind and path
        for fn in kinds.values():
            fn(model, 4)
    table = {}
    for model in models:
        for kind, fn in kinds.items():
            table[(model, kind)] = summarize([fn(model, max_tokens) for _ in range(rounds)])
    return table


def print_table(table: dict[tuple[str, str], dict[str, float]], max_tokens: int) -> None:
    print(f"\n{max_tokens}-token streamed answers; gaps between responses; late = streams whose first token came "
          f"after half the answer's time (a burst)")
    print(f"{'path':<16} {'client':<12} {'first ms':>9} {'last ms':>8} {'first/last':>10} {'gap p50':>8} "
          f"{'gap p90':>8} {'late':>7}")
    for (model, kind), r in table.items():
        print(f"{model:<16} {kind:<12} {r['first_ms']:9.1f} {r['last_ms']:8.1f} {r['first_over_last']:10.2f} "
              f"{r['gap_p50_ms']:8.2f} {r['gap_p90_ms']:8.2f} {r['late_first']:>3}/{r['streams']:<3}")
    steps = [r["gap_p50_ms"] for (_m, k), r in table.items() if k == "grpc-sync"]
    if steps:
        print(f"engine step (sync gRPC gap p50, median over paths): {statistics.median(steps):.2f} ms")


def session_nice(placement: str) -> int | None:
    """``caller``: tritonserver in this script's session (the default); ``own:N``: a session of its own with
    autogroup nice N (``own:0`` is how the launcher started it before; see mmtriton.process_session)."""
    if placement == "caller":
        return None
    kind, _, nice = placement.partition(":")
    if kind != "own" or not nice.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"{placement!r}: 'caller' or 'own:N'")
    return int(nice)


def placement_arg(placement: str) -> str:
    """argparse ``type`` for --sessions: the placement as given, refused (a usage error) unless session_nice
    reads it."""
    session_nice(placement)
    return placement


@contextlib.contextmanager
def own_servers(placement: str = "caller") -> Iterator[tuple[str, str, str]]:
    from mmtriton.openai_server import OpenAIServerConfig, OpenAIServerProcess
    from mmtriton.server import TritonServer
    from mmtriton.testing import bench_server_config, free_port
    from mmtriton.tiny_models import ensure_tiny_models

    model = ensure_tiny_models()["qwen2-vl"]
    config = bench_server_config(model, "stream-timing-tritonserver.log")
    config.session_nice = session_nice(placement)
    with TritonServer(config) as triton:
        print(f"tritonserver ready (session: {placement})", file=sys.stderr)
        openai = OpenAIServerProcess(OpenAIServerConfig(triton_url=triton.config.grpc_url, port=free_port()),
                                     log_file=ROOT / "logs" / "stream-timing-openai.log")
        openai.start()
        try:
            openai.wait_ready(timeout_s=120)
            yield triton.config.grpc_url, triton.config.http_url, openai.base_url.removeprefix("http://").removesuffix(
                "/v1")
        finally:
            openai.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc"), parser.add_argument("--http"), parser.add_argument("--openai")
    parser.add_argument("--models", nargs="+", default=PATHS)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--sessions", nargs="+", default=["caller"], metavar="PLACEMENT", type=placement_arg,
                        help="with servers of its own: one table per placement of tritonserver, 'caller' (this "
                             "script's session, as the launcher does) or 'own:N' (a session of its own, autogroup "
                             "nice N); e.g. own:0 caller")
    args = parser.parse_args()

    if args.grpc:
        kinds = client_kinds(args.grpc, args.http, args.openai)
        print_table(measure(kinds, args.models, args.rounds, args.max_tokens), args.max_tokens)
        return 0
    for placement in args.sessions:
        with own_servers(placement) as (grpc_url, http_url, openai_url):
            kinds = client_kinds(grpc_url, http_url, openai_url)
            table = measure(kinds, args.models, args.rounds, args.max_tokens)
        print(f"\n== tritonserver session: {placement}")
        print_table(table, args.max_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
