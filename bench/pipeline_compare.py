"""multimodal (ensemble) vs multimodal_bls vs multimodal_agg vs vLLM's own OpenAI server, one run, one machine.

1-image requests (24 greedy tokens, streamed) at each concurrency; prints TTFT, end-to-end latency and
requests/s per path, and each as a ratio to the vLLM server measured in the same run. The vLLM server and
tritonserver run one after the other (not together), so they do not share the 2 cores.

    .venv/bin/python bench/pipeline_compare.py [--concurrency 1 8] [--requests 24] [--openai]

bench/report.py runs the same over a concurrency range and draws the figures.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_server import TINY_MODEL_ARGS, VllmOpenAIServerProcess  # noqa: E402

from client import GrpcStreamClient, _http_body, build_inputs  # noqa: E402
from mmtriton.openai_server import OpenAIServerConfig, OpenAIServerProcess  # noqa: E402
from mmtriton.server import TritonServer  # noqa: E402
from mmtriton.testing import bench_server_config, free_port, pattern_image, png_bytes  # noqa: E402
from mmtriton.tiny_models import ensure_tiny_models  # noqa: E402

PROMPT = "Describe the image."
MAX_TOKENS = 24
WARMUP = 12  # per client thread and path


def run_load(send, concurrency: int, requests: int) -> dict[str, float]:
    """``send()`` → (ttft_s, e2e_s); ``requests`` spread over ``concurrency`` threads. Each thread warms up its own
    connection first (a fresh gRPC connection's first ~10 streamed requests showed TTFT ≈ end-to-end), and the
    clock starts when all are warm. A failed request is counted (``errors``), not fatal."""
    results: list[tuple[float, float]] = []
    failures: list[str] = []
    lock = threading.Lock()
    per_thread = max(1, requests // concurrency)
    started: list[float] = []
    ready = threading.Barrier(concurrency, action=lambda: started.append(time.perf_counter()))

    def worker():
        for _ in range(WARMUP):
            try:
                send()
            except Exception:  # noqa: BLE001 - the measured requests will report it
                pass
        ready.wait()
        for _ in range(per_thread):
            try:
                r = send()
            except Exception as exc:  # noqa: BLE001 - reported in the figures
                with lock:
                    failures.append(str(exc)[:200])
                continue
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    wall = time.perf_counter() - started[0]
    if failures:
        print(f"  {len(failures)} of {len(failures) + len(results)} requests failed, first: {failures[0]}", flush=True)
    nan = float("nan")
    return {
        "ttft_ms": statistics.median(r[0] for r in results) * 1000 if results else nan,
        "e2e_ms": statistics.median(r[1] for r in results) * 1000 if results else nan,
        "rps": len(results) / wall,
        "errors": len(failures),
    }


def sse_sender(url: str, body: bytes, is_token: Callable[[bytes], bool]):
    """``send()`` → (ttft_s, e2e_s): POST ``body`` to ``url`` and read its Server-Sent Events line by line with
    urllib; the first line ``is_token`` accepts is the first token. A ``data:`` line with an error, or a stream
    without a token, raises (run_load counts it as a failed request)."""

    def send():
        start = time.perf_counter()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        first = None
        with urllib.request.urlopen(req, timeout=300) as r:
            for line in r:
                if first is None and is_token(line):
                    first = time.perf_counter()
                if line.startswith(b"data:") and b'"error"' in line:
                    raise RuntimeError(line.decode(errors="replace")[:200])
        if first is None:  # an answer without a token is a failure, never a fast request
            raise RuntimeError(f"{url}: the stream ended without a token")
        return first - start, time.perf_counter() - start

    return send


def openai_sender(base_url: str, model: str, uri: str):
    """``send()`` for an OpenAI-compatible server (vLLM's or ours): one streamed chat request with the image."""
    body = json.dumps({
        "model": model, "max_tokens": MAX_TOKENS, "min_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                  {"type": "text", "text": PROMPT}]}],
    }).encode()
    return sse_sender(f"{base_url}/chat/completions", body,
                      lambda line: line.startswith(b"data: ") and b'"content"' in line)


def no_progress(_label: str) -> None:
    pass


def vllm_server(model: str) -> VllmOpenAIServerProcess:
    """vLLM's own OpenAI server on ``model`` as the yardstick runs it (a context manager: started and ready on
    entry). Served under its path (no --served-model-name), which is the model id openai_sender asks for."""
    extra_args = [*TINY_MODEL_ARGS, "--max-num-seqs", "16",
                  "--limit-mm-per-prompt", json.dumps({"image": 8, "video": 8})]
    return VllmOpenAIServerProcess(model, free_port(), extra_args=extra_args,
                                   log_file=ROOT / "logs" / "bench-vllm-server.log")


def bench_vllm_server(model: str, uri: str, levels: list[int], n: int,
                      step=no_progress) -> dict[int, dict[str, float]]:
    with vllm_server(model) as server:
        send = openai_sender(server.base_url, model, uri)
        out = {}
        for c in levels:
            out[c] = run_load(send, c, n)
            step(f"vLLM server c={c}")
        return out


TRITON_PATHS = ("multimodal", "multimodal_bls", "multimodal_agg")


def triton_http_sender(http_url: str, path: str, inputs):
    """``send()`` for a Triton path through HTTP ``generate_stream``: Server-Sent Events read by the same kind of
    client as vLLM's server gets. Measured by bench/cpu_per_request.py, this client costs ~2 ms of CPU per
    24-token request as vLLM's does, tritonclient's gRPC stream 6-9 ms: on 2 shared cores the client's CPU is
    taken from the server."""

    def is_token(line: bytes) -> bool:
        # One token is a bare number ("token_ids":928), more a list; the last response may have none.
        return line.startswith(b"data:") and b'"token_ids":' in line and b'"token_ids":[]' not in line

    return sse_sender(f"http://{http_url}/v2/models/{path}/generate_stream", _http_body(inputs, stream=True),
                      is_token)


class GrpcSender:
    """``send()`` for a Triton path through tritonclient's gRPC stream: one connection and stream per client
    thread, made on its first request and reused after (what a real client does), all closed by ``close()``.
    (Before, ``dict.setdefault(path, GrpcStreamClient(...))`` made a new connection for every request and never
    closed one: their threads kept running, and the client's CPU cost was counted against the server.)"""

    def __init__(self, grpc_url: str, path: str, inputs):
        self.grpc_url, self.path, self.inputs = grpc_url, path, inputs
        self._local = threading.local()
        self._made: list[GrpcStreamClient] = []
        self._lock = threading.Lock()

    def __call__(self) -> tuple[float, float]:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = GrpcStreamClient(self.grpc_url)
            with self._lock:
                self._made.append(client)
        start = time.perf_counter()
        first = None
        for _r in client.generate(self.path, self.inputs, timeout_s=60):
            first = first or time.perf_counter()
        return first - start, time.perf_counter() - start

    def close(self) -> None:
        with self._lock:
            made, self._made = self._made, []
        for client in made:
            client.close()


CLIENTS = ("http", "grpc")


def triton_sender(client: str, config, path: str, inputs):
    """The ``send()`` of one of CLIENTS for ``path`` on the server of ``config``; call ``close_sender`` after each
    run_load."""
    if client == "grpc":
        return GrpcSender(config.grpc_url, path, inputs)
    return triton_http_sender(config.http_url, path, inputs)


def close_sender(send) -> None:
    """Close what a sender holds open (GrpcSender: its connections); run_load's threads are gone by then, and the
    next run_load's make their own."""
    if isinstance(send, GrpcSender):
        send.close()


def bench_triton(model: str, uri: str, levels: list[int], n: int, step=no_progress,
                 openai_front: bool = False, while_up=None,
                 clients: tuple[str, ...] = ("http",)) -> dict[str, dict[int, dict[str, float]]]:
    """Each Triton path through each of ``clients``: "http" (generate_stream SSE, the yardstick's kind of client;
    rows named by the path) or "grpc" (tritonclient's stream; rows "<path> (grpc)"); with ``openai_front`` also
    multimodal_agg through our OpenAI server (measured by the same SSE client as vLLM's server).
    ``while_up(grpc_url, http_url, openai_url or None)`` runs last, while the servers are still up
    (bench/report.py: the arrival gaps)."""
    config = bench_server_config(model, "bench-tritonserver.log")
    server = TritonServer(config)
    server.start()
    out: dict[str, dict[int, dict[str, float]]] = {}
    try:
        server.wait_ready(900)
        inputs = build_inputs(PROMPT, sampling={"max_tokens": MAX_TOKENS, "min_tokens": MAX_TOKENS, "temperature": 0})
        inputs.image_url = [uri]
        for path in TRITON_PATHS:
            for client in clients:
                send = triton_sender(client, config, path, inputs)
                row = path if client == "http" else f"{path} ({client})"
                out[row] = {}
                for c in levels:
                    out[row][c] = run_load(send, c, n)
                    close_sender(send)
                    step(f"{row} c={c}")
        if openai_front:
            front = OpenAIServerProcess(OpenAIServerConfig(triton_url=config.grpc_url, port=free_port()),
                                        log_file=ROOT / "logs" / "bench-openai-server.log")
            front.start()
            try:
                front.wait_ready(120)
                send = openai_sender(front.base_url, "multimodal_agg", uri)
                out[OPENAI_PATH] = {}
                for c in levels:
                    out[OPENAI_PATH][c] = run_load(send, c, n)
                    step(f"{OPENAI_PATH} c={c}")
                if while_up is not None:
                    while_up(config.grpc_url, config.http_url, front.base_url.removeprefix("http://").removesuffix("/v1"))
                    while_up = None
            finally:
                front.stop()
        if while_up is not None:
            while_up(config.grpc_url, config.http_url, None)
    finally:
        server.stop()
    return out


OPENAI_PATH = "openai→agg"


def print_table(base: dict[int, dict[str, float]], triton: dict[str, dict[int, dict[str, float]]],
                levels: list[int]) -> None:
    print(f"\n1-image requests, {MAX_TOKENS} tokens streamed, tiny Qwen2-VL; ratio = path / vLLM server")
    print(f"{'path':<22}{'conc':>5}{'TTFT ms':>10}{'e2e ms':>10}{'req/s':>8}{'TTFT x':>8}{'e2e x':>8}{'req/s x':>9}"
          f"{'errors':>8}")
    for c in levels:
        b = base[c]
        print(f"{'vLLM server':<22}{c:>5}{b['ttft_ms']:>10.1f}{b['e2e_ms']:>10.1f}{b['rps']:>8.1f}"
              f"{1:>8.2f}{1:>8.2f}{1:>9.2f}{b['errors']:>8}")
        for path, per_level in triton.items():
            r = per_level[c]
            print(f"{path:<22}{c:>5}{r['ttft_ms']:>10.1f}{r['e2e_ms']:>10.1f}{r['rps']:>8.1f}"
                  f"{r['ttft_ms'] / b['ttft_ms']:>8.2f}{r['e2e_ms'] / b['e2e_ms']:>8.2f}{r['rps'] / b['rps']:>9.2f}"
                  f"{r['errors']:>8}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--openai", action="store_true", help="also multimodal_agg through mmtriton.openai_server")
    ap.add_argument("--clients", nargs="+", choices=CLIENTS, default=["http"],
                    help="how the Triton paths are called: HTTP generate_stream SSE (default; the same kind of "
                         "client as vLLM's server gets) and/or tritonclient's gRPC stream")
    args = ap.parse_args()
    (ROOT / "logs").mkdir(exist_ok=True)
    model = str(ensure_tiny_models()["qwen2-vl"])
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(pattern_image(100, 80, seed=1))).decode()
    base = bench_vllm_server(model, uri, args.concurrency, args.requests, step=print)
    triton = bench_triton(model, uri, args.concurrency, args.requests, step=print, openai_front=args.openai,
                          clients=tuple(args.clients))
    print_table(base, triton, args.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
