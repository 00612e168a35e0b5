"""Sustained concurrent load on one model, counting failures: the reproduction for stability problems that
only show under load (the multimodal_bls stub used to segfault in libpython after a few hundred requests at
concurrency 8; README, "Triton 2.51 stub traps").

    .venv/bin/python bench/stress.py [--model multimodal_bls] [--concurrency 8] [--requests-per-client 40]

Starts its own tritonserver (every model, the tiny Qwen2-VL); prints requests, failures (the first two
messages) and wall time, and exits 1 if any request failed. Check `dmesg | tail` for stub segfaults.
"""

from __future__ import annotations

import argparse
import base64
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client import GrpcStreamClient, build_inputs  # noqa: E402
from mmtriton.server import TritonServer  # noqa: E402
from mmtriton.testing import bench_server_config, pattern_image, png_bytes  # noqa: E402
from mmtriton.tiny_models import ensure_tiny_models  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="multimodal_bls")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests-per-client", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    args = ap.parse_args()
    tiny = ensure_tiny_models()["qwen2-vl"]
    config = bench_server_config(tiny, "stress-tritonserver.log")
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(pattern_image(100, 80, seed=1))).decode()
    failures: list[str] = []
    with TritonServer(config) as server:
        server.wait_ready(900, progress=True)

        def client() -> None:
            with GrpcStreamClient(config.grpc_url) as grpc:
                for _ in range(args.requests_per_client):
                    inputs = build_inputs("Describe the image.",
                                          sampling={"max_tokens": 24, "min_tokens": 24, "temperature": 0})
                    inputs.image_url = [uri]
                    try:
                        list(grpc.generate(args.model, inputs, timeout_s=args.timeout))
                    except Exception as exc:  # noqa: BLE001 - counted and reported
                        failures.append(str(exc)[:160])

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = args.concurrency * args.requests_per_client
        print(f"{args.model}: {total} requests at concurrency {args.concurrency}, {len(failures)} failed "
              f"{failures[:2]}, {time.perf_counter() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
