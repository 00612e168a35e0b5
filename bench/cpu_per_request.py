"""Where the CPU goes: CPU milliseconds per request of every process of the server, per path, under load.

On 2 cores, throughput at concurrency 8 is bounded by the CPU time each request costs, summed over every
process it touches. This runs the same 1-image, 24-token streamed requests as bench/pipeline_compare.py at one
concurrency, and reads each process's user+system CPU time before and after: tritonserver itself, every model's
stub, each vLLM engine process under a stub, and this client. vLLM's own OpenAI server (its API server and engine
core) is measured the same way first, as the yardstick.

    .venv/bin/python bench/cpu_per_request.py [--concurrency 8] [--requests 48] [--paths multimodal multimodal_agg]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pipeline_compare as pc  # noqa: E402

from client import build_inputs  # noqa: E402
from mmtriton.server import TritonServer  # noqa: E402
from mmtriton.supervisor import command_line, list_stubs  # noqa: E402
from mmtriton.testing import bench_server_config  # noqa: E402

CLIENT = "client (this script)"


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def labelled_tree(root_pid: int, label_of: Callable[[psutil.Process], str]) -> dict[int, tuple[str, psutil.Process]]:
    root = psutil.Process(root_pid)
    out = {root.pid: (label_of(root), root)}
    for p in root.children(recursive=True):
        out[p.pid] = (label_of(p), p)
    return out


def triton_labels(server_pid: int) -> Callable[[psutil.Process], str]:
    stubs = {s.pid: s.model for s in list_stubs(server_pid)}
    engine_owner = {pid: stubs[s.pid] for s in list_stubs(server_pid) for pid, _ in s.descendants}

    def label(p: psutil.Process) -> str:
        if p.pid == server_pid:
            return "tritonserver"
        if p.pid in stubs:
            return f"stub {stubs[p.pid]}"
        owner = engine_owner.get(p.pid, "?")
        name = command_line(p).split(" ", 1)[0] or "gone"
        return f"engine {owner} ({name})"

    return label


def vllm_labels(p: psutil.Process) -> str:
    return f"vLLM ({command_line(p).split(' ', 1)[0] or 'gone'})"


def measure(send: Callable[[], tuple[float, float]], tree: dict[int, tuple[str, psutil.Process]], concurrency: int,
            requests: int) -> tuple[dict[str, float], dict[str, float]]:
    """(figures of pc.run_load, CPU ms per request by label). The CPU read spans warm-up too, so warm first."""
    pc.run_load(send, concurrency, concurrency * 2)  # warm the engines (each run_load thread warms its own client)
    before = {pid: cpu_seconds(p) for pid, (_label, p) in tree.items() if p.is_running()}
    client_before = time.process_time()
    t0 = time.perf_counter()
    figures = pc.run_load(send, concurrency, requests)
    wall = time.perf_counter() - t0
    per_label: dict[str, float] = defaultdict(float)
    for pid, (label, p) in tree.items():
        try:
            per_label[label] += cpu_seconds(p) - before.get(pid, 0.0)
        except psutil.NoSuchProcess:
            continue
    per_label[CLIENT] = time.process_time() - client_before
    # The warm-up inside run_load (pc.WARMUP per thread) is in the CPU delta too: divide by every request sent.
    sent = requests + concurrency * pc.WARMUP
    ms = {k: 1e3 * v / sent for k, v in per_label.items()}
    ms["wall (all cores)"] = 1e3 * wall * psutil.cpu_count() / sent
    return figures, ms


def print_rows(title: str, figures: dict[str, float], ms: dict[str, float]) -> None:
    total = sum(v for k, v in ms.items() if k != "wall (all cores)")
    print(f"\n{title}: {figures['rps']:.1f} req/s, e2e p50 {figures['e2e_ms']:.0f} ms; CPU {total:.1f} ms/request "
          f"(core-ms available per request: {ms['wall (all cores)']:.1f})")
    for label, v in sorted(ms.items(), key=lambda kv: -kv[1]):
        if label != "wall (all cores)" and v >= 0.05:
            print(f"  {label:<44} {v:7.2f} ms  {100 * v / total:5.1f}%")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--paths", nargs="+", default=list(pc.TRITON_PATHS))
    ap.add_argument("--clients", nargs="+", choices=pc.CLIENTS, default=list(pc.CLIENTS),
                    help="how the Triton paths are called (bench/pipeline_compare.py --clients)")
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM's own server")
    args = ap.parse_args()
    model = str(pc.ensure_tiny_models()["qwen2-vl"])
    uri = "data:image/png;base64," + pc.base64.b64encode(pc.png_bytes(pc.pattern_image(100, 80, seed=1))).decode()

    if not args.no_vllm:
        with pc.vllm_server(model) as server:
            tree = labelled_tree(server.process.pid, vllm_labels)
            figures, ms = measure(pc.openai_sender(server.base_url, model, uri), tree, args.concurrency,
                                  args.requests)
            print_rows(f"vLLM server c={args.concurrency}", figures, ms)

    config = bench_server_config(model, "bench-cpu-tritonserver.log")
    with TritonServer(config) as server:
        server.wait_ready(900)
        tree = labelled_tree(server.process.pid, triton_labels(server.process.pid))
        inputs = build_inputs(pc.PROMPT, sampling={"max_tokens": pc.MAX_TOKENS, "min_tokens": pc.MAX_TOKENS,
                                                   "temperature": 0})
        inputs.image_url = [uri]
        for path in args.paths:
            for client in args.clients:
                send = pc.triton_sender(client, config, path, inputs)
                figures, ms = measure(send, tree, args.concurrency, args.requests)
                pc.close_sender(send)
                print_rows(f"{path} c={args.concurrency} ({client} client)", figures, ms)
    print(f"\n({os.cpu_count()} cores; CPU read from /proc per process, warm-up requests included in the division)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
