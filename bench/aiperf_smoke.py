"""Smoke test of bench/aiperf.sh: start a server on free ports, run AIPerf against it, check what it exported.

Targets (run one after the other, never together, so they do not share the 2 cores):
- ``triton``: tritonserver with ``multimodal_agg`` only, plus our OpenAI-compatible server
  (``python -m mmtriton.openai_server``) in front of it;
- ``vllm``: vLLM's own OpenAI server on the same tiny Qwen2-VL, served as ``multimodal_agg`` (the reference).

Passes when AIPerf's summary JSON counts exactly ``--requests`` successful requests, 0 errors, one image per
request and some output tokens (counted from the server's usage, so ``stream_options.include_usage`` is checked
too), and the per-request JSONL has as many records. Whatever it started is stopped, also on failure or Ctrl-C.
One request body as AIPerf sent it is saved (data: URL shortened) to ``<artifacts>/request_body_example.json``.

    .venv/bin/python bench/aiperf_smoke.py                  # --target triton
    .venv/bin/python bench/aiperf_smoke.py --target both --requests 20 --concurrency 2

Not part of CI: the AIPerf venv is ~1.2 GB (made by bench/aiperf.sh on first use, 1.5-3 min). With it in place,
``--target triton`` takes ~1.5 min (mostly the engine starting), ``--target vllm`` ~1 min.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from vllm_server import TINY_MODEL_ARGS, VllmOpenAIServerProcess  # noqa: E402

from mmtriton.testing import free_port  # noqa: E402

MODEL = "multimodal_agg"


class VllmTarget:
    """vLLM's own OpenAI server on the tiny model, under the same model id as ours."""

    name = "vllm"

    def __init__(self, tiny: Path):
        self.server = VllmOpenAIServerProcess(tiny, free_port(), served_model_name=MODEL, extra_args=TINY_MODEL_ARGS,
                                              log_file=ROOT / "logs" / "aiperf-smoke-vllm.log")

    def start(self) -> str:
        self.server.start()
        waited = self.server.wait_ready(600)
        url = self.server.base_url.removesuffix("/v1")
        print(f"  vLLM OpenAI server ready on {url} in {waited:.0f} s", flush=True)
        return url

    def stop(self) -> None:
        self.server.stop()


class TritonTarget:
    """tritonserver (multimodal_agg) + mmtriton.openai_server in front of it."""

    name = "triton"

    def __init__(self, tiny: Path):
        self.tiny = tiny
        self.server = None
        self.front = None

    def start(self) -> str:
        from mmtriton.openai_server import OpenAIServerConfig, OpenAIServerProcess
        from mmtriton.server import ServerConfig, TritonServer

        config = ServerConfig(
            http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), models=[MODEL],
            log_file=ROOT / "logs" / "aiperf-smoke-tritonserver.log", env={"MMT_MODEL": str(self.tiny)},
        )
        self.server = TritonServer(config)
        self.server.start()
        waited = self.server.wait_ready(timeout_s=900, progress=True)
        print(f"  tritonserver ready (gRPC {config.grpc_url}) in {waited:.0f} s", flush=True)
        self.front = OpenAIServerProcess(OpenAIServerConfig(triton_url=config.grpc_url, port=free_port(),
                                                            models=[MODEL]),
                                         log_file=ROOT / "logs" / "aiperf-smoke-openai.log")
        self.front.start()
        self.front.wait_ready(120)
        print(f"  OpenAI server ready on {self.front.base_url}", flush=True)
        return self.front.base_url.removesuffix("/v1")

    def stop(self) -> None:
        if self.front is not None:
            self.front.stop()
            self.front = None
        if self.server is not None:
            self.server.stop()
            self.server = None


def shorten(obj):
    """The request body with data: URLs cut to a readable length."""
    if isinstance(obj, dict):
        return {k: shorten(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shorten(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("data:") and len(obj) > 80:
        return f"{obj[:60]}...<{len(obj)} chars>"
    return obj


def check_artifacts(artifacts: Path, requests: int, images: int) -> list[str]:
    """What is wrong with AIPerf's export, as messages; empty when the run is as expected."""
    problems = []
    summary_path = artifacts / "profile_export_aiperf.json"
    if not summary_path.exists():
        return [f"no {summary_path.name} (AIPerf did not finish)"]
    summary = json.loads(summary_path.read_text())

    def avg(name):
        return (summary.get(name) or {}).get("avg")

    if avg("request_count") != requests:
        problems.append(f"request_count {avg('request_count')} != {requests}")
    if avg("error_request_count") not in (None, 0):
        problems.append(f"error_request_count {avg('error_request_count')}: {summary.get('error_summary')}")
    if summary.get("error_summary"):
        problems.append(f"error_summary: {summary['error_summary']}")
    if summary.get("was_cancelled"):
        problems.append("the run was cancelled")
    if images and avg("num_images") != images:
        problems.append(f"num_images avg {avg('num_images')} != {images}")
    # --server-tokens: the counts come from the server's usage chunk (stream_options.include_usage).
    if not (avg("usage_completion_tokens") or 0) > 0:
        problems.append(f"no completion tokens in the server's usage: {summary.get('usage_completion_tokens')}")
    if not (avg("time_to_first_token") or 0) > 0:
        problems.append("no time_to_first_token: not streamed?")
    records_path = artifacts / "profile_export.jsonl"
    lines = records_path.read_text().splitlines() if records_path.exists() else []
    # The JSONL holds the warm-up requests too: count the measured ones.
    records = [r for r in map(json.loads, filter(str.strip, lines))
               if r.get("metadata", {}).get("benchmark_phase") == "profiling"]
    if len(records) != requests:
        problems.append(f"{len(records)} per-request records != {requests}")
    failed = [r["error"] for r in records if r.get("error")]
    if failed:
        problems.append(f"{len(failed)} records with errors, first: {failed[0]}")
    return problems


def save_example_request(artifacts: Path) -> None:
    raw = artifacts / "profile_export_raw.jsonl"
    if not raw.exists():
        return
    with raw.open() as f:
        first = json.loads(f.readline())
    example = {"request_headers": first.get("request_headers"), "payload": shorten(first.get("payload"))}
    out = artifacts / "request_body_example.json"
    out.write_text(json.dumps(example, indent=2) + "\n")
    print(f"  one request as AIPerf sent it ({out}):\n{json.dumps(example['payload'], indent=2)}")


def run_target(target, args, tiny: Path) -> bool:
    print(f"== target {target.name} ==", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    artifacts = ROOT / "bench" / "results" / "aiperf" / f"smoke-{target.name}-{stamp}"
    t0 = time.monotonic()
    try:
        url = target.start()
        cmd = [str(ROOT / "bench" / "aiperf.sh"), "--url", url, "--model", MODEL, "--tokenizer", str(tiny),
               "--requests", str(args.requests), "--concurrency", str(args.concurrency),
               "--images", str(args.images), "--artifact-dir", str(artifacts), "--raw", "--server-tokens"]
        print("  $ " + " ".join(cmd), flush=True)
        t1 = time.monotonic()
        rc = subprocess.run(cmd, timeout=args.timeout).returncode
        print(f"  aiperf.sh exit {rc} after {time.monotonic() - t1:.0f} s", flush=True)
        problems = check_artifacts(artifacts, args.requests, args.images)
        if rc != 0:
            problems.insert(0, f"bench/aiperf.sh exited {rc}")
        save_example_request(artifacts)
    except Exception as exc:  # noqa: BLE001 - reported as this target's failure
        problems = [f"{type(exc).__name__}: {exc}"]
    finally:
        target.stop()
    verdict = "PASS" if not problems else "FAIL"
    print(f"== {target.name}: {verdict} in {time.monotonic() - t0:.0f} s (artifacts: {artifacts})", flush=True)
    for p in problems:
        print(f"   - {p}", flush=True)
    return not problems


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["triton", "vllm", "both"], default="triton")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for bench/aiperf.sh (venv included)")
    args = parser.parse_args()

    # SIGTERM (e.g. from a CI timeout) unwinds like Ctrl-C, so the finally blocks stop the servers.
    signal.signal(signal.SIGTERM, _interrupt)
    from mmtriton.tiny_models import ensure_tiny_models

    tiny = ensure_tiny_models()["qwen2-vl"]
    # The venv first (a no-op once made), so its first-time install is not counted against a server's time.
    subprocess.run([str(ROOT / "bench" / "aiperf.sh"), "--setup-only"], check=True, timeout=args.timeout)
    names = ["vllm", "triton"] if args.target == "both" else [args.target]
    targets = {"vllm": VllmTarget, "triton": TritonTarget}
    results = {name: run_target(targets[name](tiny), args, tiny) for name in names}
    print("summary: " + ", ".join(f"{n} {'PASS' if ok else 'FAIL'}" for n, ok in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
