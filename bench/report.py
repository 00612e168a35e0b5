"""The benchmark report: every path (multimodal, multimodal_bls, multimodal_agg, multimodal_agg through our
OpenAI server) against vLLM's own OpenAI server on the same tiny model, over a range of concurrencies, in one run.
A progress bar while it runs; then the table, the arrival gaps of streamed responses per front door (gRPC sync
and asyncio, HTTP generate_stream, OpenAI SSE: bench/stream_timing.py, with the servers still up), and a PNG
(latency and throughput vs concurrency, one line per path) with the figures as JSON and CSV beside it.

    .venv/bin/python bench/report.py [--concurrency 1 2 4 8] [--requests 24] [--out bench/results/report]

~6 min on 2 cores with the defaults (the servers start one after the other, so they never share the cores).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline_compare as pc  # noqa: E402
import stream_timing as st  # noqa: E402

BASELINE = "vLLM server"


def plot(results: dict[str, dict[int, dict[str, float]]], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("e2e_ms", "end-to-end latency, median (ms)"), ("ttft_ms", "time to first token, median (ms)"),
              ("rps", "throughput (requests/s)"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for path, per_level in results.items():
            levels = sorted(per_level)
            ax.plot(levels, [per_level[c][key] for c in levels], marker="o", label=path,
                    linestyle="--" if path == BASELINE else "-", color="black" if path == BASELINE else None)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> int:
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--requests", type=int, default=24, help="requests per path and concurrency (after warm-up)")
    ap.add_argument("--clients", nargs="+", choices=pc.CLIENTS, default=list(pc.CLIENTS),
                    help="how the Triton paths are called: HTTP generate_stream SSE (rows named by the path; the "
                         "yardstick's kind of client) and tritonclient's gRPC stream (rows '<path> (grpc)')")
    ap.add_argument("--stream-rounds", type=int, default=6,
                    help="streams per path and client kind for the arrival-gap table (bench/stream_timing.py)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"report-{time.strftime('%Y%m%d-%H%M%S')}",
                    help="output prefix: writes PREFIX.png, PREFIX.json, PREFIX.csv")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    (ROOT / "logs").mkdir(exist_ok=True)

    model = str(pc.ensure_tiny_models()["qwen2-vl"])
    uri = "data:image/png;base64," + pc.base64.b64encode(pc.png_bytes(pc.pattern_image(100, 80, seed=1))).decode()
    levels = sorted(args.concurrency)
    paths = [BASELINE, *(p for p in pc.TRITON_PATHS for _ in args.clients), pc.OPENAI_PATH]
    with tqdm(total=len(paths) * len(levels), desc="starting vLLM server", unit="run") as bar:

        def step(label: str) -> None:
            bar.set_description(label)
            bar.update()

        base = pc.bench_vllm_server(model, uri, levels, args.requests, step=step)
        bar.set_description("starting tritonserver")
        arrivals: dict = {}

        def measure_arrivals(grpc_url: str, http_url: str, openai_url: str | None) -> None:
            bar.set_description("arrival gaps per front door")
            kinds = st.client_kinds(grpc_url, http_url, openai_url)
            arrivals.update(st.measure(kinds, st.PATHS, args.stream_rounds, st.MAX_TOKENS))

        triton = pc.bench_triton(model, uri, levels, args.requests, step=step, openai_front=True,
                                 while_up=measure_arrivals, clients=tuple(args.clients))

    results = {BASELINE: base, **triton}
    pc.print_table(base, triton, levels)
    st.print_table(arrivals, st.MAX_TOKENS)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"model": "tiny Qwen2-VL", "max_tokens": pc.MAX_TOKENS, "requests": args.requests,
         "results": {p: {str(c): r for c, r in v.items()} for p, v in results.items()},
         "arrivals": {f"{m} {k}": r for (m, k), r in arrivals.items()}}, indent=2))
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "concurrency", "ttft_ms", "e2e_ms", "rps", "e2e_ratio_to_vllm_server", "errors"])
        for path, per_level in results.items():
            for c in levels:
                r = per_level[c]
                w.writerow([path, c, f"{r['ttft_ms']:.2f}", f"{r['e2e_ms']:.2f}", f"{r['rps']:.3f}",
                            f"{r['e2e_ms'] / base[c]['e2e_ms']:.3f}", r["errors"]])
    png = args.out.with_suffix(".png")
    plot(results, png, f"1-image requests, {pc.MAX_TOKENS} streamed tokens, tiny Qwen2-VL, 2 cores")
    print(f"\nwrote {png}, {args.out.with_suffix('.json').name}, {args.out.with_suffix('.csv').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
