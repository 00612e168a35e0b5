"""Fault injection under load: kill each stage's process (every stub, every EngineCore, every vLLM worker) by its
exact PID while clients send image requests through all three paths, and measure what the clients saw.

For each fault it prints: how long until every path answered correctly again (tokens equal to the tokens before
the fault), the requests that failed meanwhile (each must be an error: none empty, none past its deadline, none
with other tokens), whether the embedding pools went back to zero, and whether Triton reported the struck model
not ready meanwhile. At the end: how long the server took to stop, and whether any process its tree had during
the run (replacements included) outlived it. The processes it kills are found in the server's own process tree
(mmtriton.supervisor's stub list), never by pattern.

    .venv/bin/python bench/faults.py                       # every fault, ~1 min each on 2 cores
    .venv/bin/python bench/faults.py --faults engine:llm_decode stub:encoder_image --clients 4

Heavy: one pipeline server (~10 GB). Not in CI (tests/test_recovery_server.py and test_supervisor_server.py are
its CI slice).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the client package

from client import InferenceFailed, build_inputs, stream_grpc  # noqa: E402
from mmtriton.supervisor import command_line, descendant_named, newest_stub  # noqa: E402
from mmtriton.testing import bench_server_config, metric, pattern_image, png_bytes  # noqa: E402

PATHS = ("multimodal_agg", "multimodal", "multimodal_bls")
ENGINE_MODELS = ("multimodal_agg", "llm_prefill", "llm_decode")
STUB_MODELS = ("encoder_image", "encoder_audio", "preprocess", "llm_prefill", "llm_decode", "multimodal_agg",
               "multimodal_bls")
DEFAULT_FAULTS = ([f"stub:{m}" for m in STUB_MODELS] + [f"engine:{m}" for m in ENGINE_MODELS]
                  + [f"worker:{m}" for m in ENGINE_MODELS])
REQUEST_DEADLINE_S = 60.0  # a request that takes longer counts as hung
RECOVERY_LIMIT_S = 300.0
SHUTDOWN_LIMIT_S = 15.0  # stop → every process of the server's tree gone


@dataclass
class Outcome:
    path: str
    started: float
    ended: float
    kind: str  # "ok", "wrong", "empty", "error", "hung"
    detail: str = ""


@dataclass
class Load:
    """Clients sending the same image request round-robin over the paths; every outcome is kept."""

    url: str
    want: dict[str, list[int]]
    clients: int
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(REQUEST_DEADLINE_S + 10)

    def _client(self, index: int) -> None:
        n = index
        while not self._stop.is_set():
            path = PATHS[n % len(PATHS)]
            n += 1
            self.outcomes.append(one_request(self.url, path, self.want[path]))


def request_inputs():
    image = "data:image/png;base64," + base64.b64encode(png_bytes(pattern_image(100, 80, seed=2))).decode()
    return build_inputs("Describe the image.", images=[image], sampling={"max_tokens": 8, "temperature": 0})


def one_request(url: str, path: str, want: list[int] | None) -> Outcome:
    t0 = time.monotonic()
    try:
        got = [t for r in stream_grpc(url, path, request_inputs(), timeout_s=REQUEST_DEADLINE_S)
               for t in r["token_ids"]]
    except InferenceFailed as exc:
        return Outcome(path, t0, time.monotonic(), "error", str(exc)[:160])
    except TimeoutError:
        return Outcome(path, t0, time.monotonic(), "hung")
    ended = time.monotonic()
    if ended - t0 > REQUEST_DEADLINE_S:
        return Outcome(path, t0, ended, "hung")
    if not got:
        return Outcome(path, t0, ended, "empty")
    if want is not None and got != want:
        return Outcome(path, t0, ended, "wrong", f"{got} != {want}")
    return Outcome(path, t0, ended, "ok")


def target_pid(server_pid: int, fault: str) -> int:
    """The exact PID to kill for ``fault`` ("stub:<model>", "engine:<model>", "worker:<model>")."""
    what, model = fault.split(":", 1)
    stub = newest_stub(server_pid, model)
    if stub is None:
        raise LookupError(f"no stub for {model}")
    if what == "stub":
        return stub.pid
    marker = "EngineCore" if what == "engine" else "Worker"
    found = descendant_named(stub.pid, marker)
    if found is None:
        names = sorted(command_line(c) for c in psutil.Process(stub.pid).children(recursive=True))
        raise LookupError(f"no {marker} process under {model}'s stub (pid {stub.pid}): {names[:4]}")
    return found.pid


def ready(http_url: str, model: str | None = None) -> bool:
    path = "/v2/health/ready" if model is None else f"/v2/models/{model}/ready"
    try:
        with urllib.request.urlopen(f"http://{http_url}{path}", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def pools_at_zero(server) -> bool:
    try:
        return all(metric(server, "mmtriton_embedding_pool", "bytes_in_use", m) == 0
                   for m in ("encoder_image",))
    except (AssertionError, KeyError, ValueError, OSError):
        return False


def inject(server, load: Load, fault: str) -> dict:
    url, http_url = server.config.grpc_url, server.config.http_url
    model = fault.split(":", 1)[1]
    pid = target_pid(server.process.pid, fault)
    seen_not_ready = {"model": False, "server": False}
    stop_watch = threading.Event()

    def watch() -> None:
        while not stop_watch.wait(0.2):
            seen_not_ready["model"] |= not ready(http_url, model)
            seen_not_ready["server"] |= not ready(http_url)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    before = len(load.outcomes)
    killed_at = time.monotonic()
    psutil.Process(pid).kill()
    recovered_at = None
    while time.monotonic() - killed_at < RECOVERY_LIMIT_S:
        time.sleep(1.0)
        if not ready(http_url):
            continue
        probes = [one_request(url, path, load.want[path]) for path in PATHS]
        if all(p.kind == "ok" for p in probes):
            recovered_at = time.monotonic()
            break
    stop_watch.set()
    watcher.join(5)
    time.sleep(2.0)  # let the requests started before recovery end
    window = [o for o in load.outcomes[before:] if o.started < (recovered_at or time.monotonic())]
    counts = {k: sum(o.kind == k for o in window) for k in ("ok", "error", "empty", "hung", "wrong")}
    deadline = time.monotonic() + 70  # an unacknowledged region is reclaimed after its ack timeout (60 s)
    while not pools_at_zero(server) and time.monotonic() < deadline:
        time.sleep(1.0)
    return {
        "fault": fault, "pid": pid,
        "recovered_s": None if recovered_at is None else round(recovered_at - killed_at, 1),
        **counts,
        "not_ready_seen": seen_not_ready["model"], "server_not_ready_seen": seen_not_ready["server"],
        "pools_zero": pools_at_zero(server),
        "errors": sorted({o.detail[:90] for o in window if o.kind == "error"})[:3],
    }


def main(argv: list[str] | None = None) -> int:
    from mmtriton.server import TritonServer
    from mmtriton.tiny_models import ensure_tiny_models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", nargs="*", default=DEFAULT_FAULTS)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/results/faults.json"))
    args = parser.parse_args(argv)

    server = TritonServer(bench_server_config(ensure_tiny_models(progress=True)["qwen2-vl"],
                                              "bench-tritonserver-faults.log"))
    server.start()
    rows = []
    seen = ProcessesSeen(server.process.pid)
    try:
        print(f"starting the server ({server.config.log_file}) …", flush=True)
        server.wait_ready(900, progress=True)
        url = server.config.grpc_url
        want = {}
        for path in PATHS:
            reference = [t for r in stream_grpc(url, path, request_inputs(), timeout_s=120) for t in r["token_ids"]]
            assert reference, f"{path}: no tokens before any fault"
            want[path] = reference
        assert len({tuple(v) for v in want.values()}) == 1, f"paths disagree before any fault: {want}"
        for fault in args.faults:
            load = Load(url, want, args.clients)
            load.start()
            time.sleep(3.0)  # steady load first
            try:
                row = inject(server, load, fault)
            finally:
                load.stop()
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        seen.stop()
        t0 = time.monotonic()
        server.stop()
        stopped_s = time.monotonic() - t0
    left = seen.left_running()
    while left and time.monotonic() - t0 < SHUTDOWN_LIMIT_S:  # the stop returns before every child has exited
        time.sleep(0.2)
        left = seen.left_running()
    print(f"\nserver stopped in {stopped_s:.1f} s, every process of its tree gone after {time.monotonic() - t0:.1f} s "
          f"(limit {SHUTDOWN_LIMIT_S:.0f} s); processes seen in its tree during the run: {len(seen.procs)}; "
          f"left running: {left or 'none'}")
    header = ("fault", "recovered_s", "ok", "error", "empty", "hung", "wrong", "not_ready_seen",
              "server_not_ready_seen", "pools_zero")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    bad = [r["fault"] for r in rows if r["recovered_s"] is None or r["empty"] or r["hung"] or r["wrong"]
           or not r["pools_zero"]]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} faults healed cleanly" + (f"; not: {bad}" if bad else ""))
    return 1 if bad or left else 0


class ProcessesSeen:
    """Every process of the server's tree during the run (stubs, EngineCores, workers, their replacements), to
    check that none outlives the server."""

    def __init__(self, root_pid: int, interval_s: float = 1.0):
        self.root = psutil.Process(root_pid)
        self.procs: dict[int, psutil.Process] = {root_pid: self.root}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                for child in self.root.children(recursive=True):
                    self.procs.setdefault(child.pid, child)
            except psutil.Error:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def left_running(self) -> list[str]:
        left = []
        for proc in self.procs.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:  # same pid and start time
                    left.append(f"{proc.pid} {proc.name()}")
            except psutil.Error:
                pass
        return left


if __name__ == "__main__":
    raise SystemExit(main())
