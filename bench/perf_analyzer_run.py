"""perf_analyzer against our decoupled models, in one command: text + image, video or audio requests, gRPC streaming.

    .venv/bin/python bench/perf_analyzer_run.py                        # starts a server (tiny model) itself
    .venv/bin/python bench/perf_analyzer_run.py --url 127.0.0.1:8001 --model multimodal --concurrency-range 1:8:2
    .venv/bin/python bench/perf_analyzer_run.py --image-size 448x336 --images-per-request 2 -- --max-trials 20
    .venv/bin/python bench/perf_analyzer_run.py --modality video --num-frames 8 --model multimodal_agg multimodal
    .venv/bin/python bench/perf_analyzer_run.py --modality audio --model multimodal_agg multimodal  # tiny Qwen2-Audio

Several --model: one server (started once, with what they all need), one perf_analyzer run each. A started server
serves the tiny Qwen2-VL (image, video) or the tiny Qwen2-Audio (audio) unless --checkpoint says otherwise.
Writes bench/results/perf_analyzer-<model>-<time>/{inputs.json, perf.csv, profile.json, perf_analyzer.txt},
prints perf_analyzer's own report and then, from its profile export, time to first response and between responses.
Why the second table: perf_analyzer 2.51 says "using the first response for measuring latency" for decoupled models,
but its latency figures are to the final response (they equal the profile's last-response times), and it has no
first-token figures. Its "Server:" section is meaningless here: a decoupled Python model's execute() returns at once.
Install perf_analyzer with tools/install_perf_analyzer.sh (bin/setup does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_analyzer_inputs import add_arguments, entries_from_args, write_input_data  # noqa: E402

from mmtriton.testing import bench_server_config  # noqa: E402

PERF_ANALYZER = ROOT / ".venv" / "perf_analyzer" / "perf_analyzer"
# What multimodal / multimodal_bls call (the ensemble names both encoders, whichever the request needs).
STAGES = ["preprocess", "encoder_image", "encoder_audio", "llm_prefill", "llm_decode"]
TINY_FOR = {"image": "qwen2-vl", "video": "qwen2-vl", "audio": "qwen2-audio"}  # a started server's checkpoint


def perf_analyzer_command(model: str, url: str, input_data: Path, csv: Path, profile: Path | None,
                          concurrency: str, interval_ms: int = 3000, stability: int = 30,
                          extra: list[str] | None = None) -> list[str]:
    if not PERF_ANALYZER.exists():
        raise SystemExit(f"{PERF_ANALYZER} missing: run tools/install_perf_analyzer.sh (bin/setup does)")
    # --streaming: our models are decoupled, which perf_analyzer serves only over a gRPC stream.
    # 3 s windows and 30% stability: 2 loaded cores never settle within perf_analyzer's default 10%.
    cmd = [str(PERF_ANALYZER), "-m", model, "-i", "grpc", "-u", url, "--streaming", "--input-data", str(input_data),
           "--concurrency-range", concurrency, "--measurement-interval", str(interval_ms),
           "--stability-percentage", str(stability), "-f", str(csv)]
    if profile is not None:  # per-request timestamps of every response: the first-token figures come from it
        cmd += ["--profile-export-file", str(profile)]
    return cmd + list(extra or [])


def profile_summary(profile: Path) -> list[dict[str, Any]]:
    """Per concurrency level: first-response and final-response latency, and the gap between responses (ms)."""
    rows = []
    for exp in json.loads(profile.read_text())["experiments"]:
        first, last, gaps, responses = [], [], [], 0
        for req in exp["requests"]:
            t0, ts = req["timestamp"], req["response_timestamps"]
            if not ts:
                continue
            first.append((ts[0] - t0) / 1e6)
            last.append((ts[-1] - t0) / 1e6)
            gaps += [(b - a) / 1e6 for a, b in zip(ts, ts[1:], strict=False)]
            responses += len(ts)
        if not first:
            continue
        rows.append({"concurrency": exp["experiment"]["value"], "requests": len(first),
                     "responses_per_request": responses / len(first),
                     "first_p50": statistics.median(first), "first_p90": _p90(first),
                     "last_p50": statistics.median(last), "last_p90": _p90(last),
                     "gap_mean": statistics.fmean(gaps) if gaps else 0.0})
    return rows


def _p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))]


def print_profile_summary(rows: list[dict[str, Any]]) -> None:
    print("\nFrom the profile export (ms): first response = time to first token when streaming")
    print(f"{'conc':>4} {'requests':>8} {'resp/req':>8} {'first p50':>9} {'first p90':>9} {'final p50':>9} "
          f"{'final p90':>9} {'between responses':>17}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['requests']:>8} {r['responses_per_request']:>8.1f} {r['first_p50']:>9.1f} "
              f"{r['first_p90']:>9.1f} {r['last_p50']:>9.1f} {r['last_p90']:>9.1f} {r['gap_mean']:>17.2f}")


def start_server(models: list[str], checkpoint: str | None, modality: str = "image"):
    """Our launcher on free ports (others may serve on this machine), loading only what ``models`` need."""
    from mmtriton.server import TritonServer
    from mmtriton.tiny_models import ensure_tiny_models

    path = str(Path(checkpoint).resolve()) if checkpoint else str(ensure_tiny_models()[TINY_FOR[modality]])
    if {"multimodal", "multimodal_bls"} & set(models):
        models = [*models, *(s for s in STAGES if s not in models)]
    config = bench_server_config(path, "perf-analyzer-tritonserver.log", models)
    server = TritonServer(config)
    server.start()
    try:
        ready_s = server.wait_ready(900, progress=True)
        print(f"server ready in {ready_s:.0f} s ({config.grpc_url}, log {config.log_file})")
    except BaseException:
        server.stop()
        raise
    return server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="arguments after -- go to perf_analyzer as they are")
    ap.add_argument("--model", nargs="+", default=["multimodal_agg"], help="one perf_analyzer run per model")
    ap.add_argument("--url", help="gRPC host:port of a running server (default: start one)")
    ap.add_argument("--checkpoint", help="checkpoint directory for a started server (default: the tiny Qwen2-VL; "
                                         "for --modality audio the tiny Qwen2-Audio)")
    ap.add_argument("--concurrency-range", default="1:4:1", help="start:end:step")
    ap.add_argument("--measurement-interval", type=int, default=3000, help="ms")
    ap.add_argument("--stability-percentage", type=int, default=30)
    ap.add_argument("--out", type=Path, help="output folder (default bench/results/perf_analyzer-<model>-<time>)")
    add_arguments(ap)
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:len(argv) - len(extra) - 1] if "--" in argv else argv)

    stamp = time.strftime('%Y%m%d-%H%M%S')
    entries = entries_from_args(args)
    server = None if args.url else start_server(args.model, args.checkpoint, args.modality)
    codes = []
    try:
        url = args.url or server.config.grpc_url
        for model in args.model:
            out = (args.out / model if len(args.model) > 1 else args.out) if args.out else \
                ROOT / "bench" / "results" / f"perf_analyzer-{model}-{args.modality}-{stamp}"
            codes.append(run_one(model, url, out, entries, args, extra))
    finally:
        if server is not None:
            server.stop()
    return max(codes)


def run_one(model: str, url: str, out: Path, entries: list[dict[str, Any]], args: argparse.Namespace,
            extra: list[str]) -> int:
    """One perf_analyzer run against ``model``; its report as it comes, then the profile's first-token table."""
    out.mkdir(parents=True, exist_ok=True)
    inputs = write_input_data(out / "inputs.json", entries)
    csv, profile = out / "perf.csv", out / "profile.json"
    cmd = perf_analyzer_command(model, url, inputs, csv, profile, args.concurrency_range,
                                args.measurement_interval, args.stability_percentage, extra)
    print("$", " ".join(cmd), flush=True)
    with open(out / "perf_analyzer.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # shown as it comes (a run takes minutes) and kept
            print(line, end="", flush=True)
            log.write(line)
        rc = proc.wait()
    if profile.exists():
        print(f"\n{model}, {args.modality} requests:", end="")
        print_profile_summary(profile_summary(profile))
    print(f"\nperf_analyzer exit code {rc}; CSV: {csv}" + ("" if csv.exists() else " (not written)"))
    print(f"outputs: {out}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
