"""Embedding transfer bandwidth: EmbeddingSender in a child process, EmbeddingReceiver in this one.

For each size prints the median per-transfer latency and GB/s of

* ``fetch()`` end to end (validate, READ into the receiver pool, copy out into a fresh tensor, ack), and
  ``fetch(out=buf)`` into a caller-owned tensor (no allocation / page faults),
* the raw NIXL READ alone: of regions the sender has just written (fresh, what fetch() meets), and one
  request reposted on one region (warm, like the memcpy yardsticks),
* an in-process ``dst.copy_(src)`` of the same bytes (the memcpy yardstick), and a plain memmove,

and the ratios NIXL / memcpy; then the idle CPU% of a sender and a receiver process over 3 s.

    .venv/bin/python bench/transfer_bandwidth.py [--iters 20] [--sizes 4K,1M,16M,64M] [--tls tcp,self]
        [--error-handling none|peer]
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import psutil  # noqa: E402
import torch  # noqa: E402

from mmtriton.transfer import EmbeddingDescriptor, EmbeddingReceiver, EmbeddingSender  # noqa: E402

SENDER_POOL = 576 << 20
RECEIVER_POOL = 128 << 20
TIMEOUT_S = 60


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def human(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:g} {unit}"
    return f"{n} B"


def sender_main(cmd_q: Any, res_q: Any, env: dict[str, str], error_handling: str) -> None:
    os.environ.update(env)
    sender = EmbeddingSender("bench-sender", SENDER_POOL, ack_timeout_s=120, error_handling=error_handling)
    res_q.put(os.getpid())
    while True:
        try:
            cmd, *args = cmd_q.get(timeout=600)
        except queue.Empty:
            break
        if cmd == "put":
            nbytes, count = args
            t = torch.full((nbytes,), 7, dtype=torch.uint8)
            res_q.put([sender.put(t).to_json() for _ in range(count)])
        elif cmd == "occupancy":
            res_q.put(sender.occupancy().regions_in_use)
        elif cmd == "exit":
            break
    sender.close()


class SenderProc:
    def __init__(self, env: dict[str, str], error_handling: str) -> None:
        ctx = mp.get_context("spawn")
        self.cmd_q, self.res_q = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=sender_main, args=(self.cmd_q, self.res_q, env, error_handling), daemon=True)
        self.proc.start()
        self.pid: int = self.res_q.get(timeout=TIMEOUT_S)

    def call(self, *cmd: Any) -> Any:
        self.cmd_q.put(cmd)
        return self.res_q.get(timeout=TIMEOUT_S)

    def wait_idle(self) -> None:
        deadline = time.monotonic() + 10
        while self.call("occupancy") and time.monotonic() < deadline:
            time.sleep(0.005)

    def stop(self) -> None:
        self.cmd_q.put(("exit",))
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def time_fetch(
    sender: SenderProc, receiver: EmbeddingReceiver, nbytes: int, iters: int, reuse_out: bool
) -> list[float]:
    """Latency of fetch() alone (into a fresh tensor, or into one caller-owned ``out``); puts are done in
    batches that fit the sender's pool."""
    per_batch = max(1, min(iters, SENDER_POOL // nbytes - 1))
    out = torch.zeros(nbytes, dtype=torch.uint8) if reuse_out else None
    times: list[float] = []
    warm = True
    while len(times) < iters:
        texts = sender.call("put", nbytes, per_batch)
        for text in texts:
            desc = EmbeddingDescriptor.from_json(text)
            t0 = time.perf_counter()
            got = receiver.fetch(desc, timeout_s=TIMEOUT_S, out=out)
            dt = time.perf_counter() - t0
            assert got[-1].item() == 7
            if warm:  # the first fetch of a size connects / warms caches
                warm = False
                continue
            times.append(dt)
        sender.wait_idle()
    return times[:iters]


def _read_once(receiver: EmbeddingReceiver, handle: Any) -> float:
    agent = receiver._agent
    t0 = time.perf_counter()
    state = agent.transfer(handle)
    while state == "PROC":
        state = agent.check_xfer_state(handle)
    dt = time.perf_counter() - t0
    assert state == "DONE", state
    return dt


def _read_handle(receiver: EmbeddingReceiver, desc: EmbeddingDescriptor) -> Any:
    agent = receiver._agent  # the bench peeks inside: the bare READ is the point of comparison
    with receiver._nixl_lock:
        receiver._ensure_peer_locked(desc)
        local = agent.get_xfer_descs([(receiver._base, desc.nbytes, 0)], "DRAM")
        remote = agent.get_xfer_descs([(desc.addr, desc.nbytes, 0)], "DRAM")
        return agent.initialize_xfer("READ", local, remote, desc.agent)


def time_raw_read(sender: SenderProc, receiver: EmbeddingReceiver, nbytes: int, iters: int, fresh: bool) -> list[float]:
    """The NIXL READ alone, posted to completion, without our bookkeeping.

    fresh=False reposts one request on one region (source cache-warm, like the memcpy yardstick);
    fresh=True reads each region of a batch the sender has just written once (what fetch() meets).
    """
    times: list[float] = []
    while len(times) < iters:
        count = 1 if not fresh else max(1, min(iters, SENDER_POOL // nbytes - 1))
        descs = [EmbeddingDescriptor.from_json(t) for t in sender.call("put", nbytes, count)]
        for desc in descs:
            handle = _read_handle(receiver, desc)
            for i in range(1 if fresh else iters + 1):
                dt = _read_once(receiver, handle)
                if fresh or i:  # reposting: the first read warms the source
                    times.append(dt)
            handle.release()
        for desc in descs:
            receiver.fetch(desc, timeout_s=TIMEOUT_S)  # ack, so the sender's pool is clean again
        sender.wait_idle()
    return times[:iters]


def time_memcpy(nbytes: int, iters: int, how: str) -> list[float]:
    """In-process copy of the same bytes between two warm buffers: torch ``dst.copy_(src)`` or a memmove."""
    src = torch.full((nbytes,), 3, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    dst.copy_(src)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        if how == "torch":
            dst.copy_(src)
        else:
            ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)
        times.append(time.perf_counter() - t0)
    return times


def idle_cpu(pid: int, seconds: float = 3.0) -> float:
    p = psutil.Process(pid)
    t0 = p.cpu_times()
    time.sleep(seconds)
    t1 = p.cpu_times()
    return 100.0 * ((t1.user - t0.user) + (t1.system - t0.system)) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20, help="transfers per size (median reported)")
    ap.add_argument("--sizes", default="4K,1M,16M,64M")
    ap.add_argument("--tls", default=None, help="UCX_TLS for both processes, e.g. tcp,self (default: UCX picks)")
    ap.add_argument("--error-handling", default="none", choices=["none", "peer"], help="UCX error handling mode")
    args = ap.parse_args()
    env = {"UCX_TLS": args.tls} if args.tls else {}
    os.environ.update(env)
    sizes = [parse_size(s) for s in args.sizes.split(",")]

    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"UCX_TLS={os.environ.get('UCX_TLS', '(default)')}, ucx_error_handling_mode={args.error_handling}, "
        f"iters={args.iters}"
    )
    sender = SenderProc(env, args.error_handling)
    receiver = EmbeddingReceiver("bench-receiver", RECEIVER_POOL, error_handling=args.error_handling)
    try:
        head = (
            f"{'size':>9} | {'fetch() us':>10} {'GB/s':>6} | {'fetch(out) us':>13} {'GB/s':>6} | "
            f"{'READ fresh us':>13} {'GB/s':>6} | {'READ warm us':>12} {'GB/s':>6} | "
            f"{'copy_ us':>9} {'GB/s':>6} | {'memmove us':>10} {'GB/s':>6} | "
            f"{'warm/copy_':>10} {'fresh/copy_':>11} {'warm/memmove':>12}"
        )
        print(head)
        print("-" * len(head))
        for n in sizes:
            fetch = statistics.median(time_fetch(sender, receiver, n, args.iters, reuse_out=False))
            fetch_out = statistics.median(time_fetch(sender, receiver, n, args.iters, reuse_out=True))
            fresh = statistics.median(time_raw_read(sender, receiver, n, args.iters, fresh=True))
            warm = statistics.median(time_raw_read(sender, receiver, n, args.iters, fresh=False))
            cpy = statistics.median(time_memcpy(n, args.iters, "torch"))
            mmv = statistics.median(time_memcpy(n, args.iters, "memmove"))
            timed = ((fetch, 10), (fetch_out, 13), (fresh, 13), (warm, 12), (cpy, 9), (mmv, 10))
            cols = [f"{t * 1e6:{w}.1f} {n / t / 1e9:6.2f}" for t, w in timed]
            ratios = f"{cpy / warm:10.0%} {cpy / fresh:11.0%} {mmv / warm:12.0%}"
            print(f"{human(n):>9} | " + " | ".join(cols) + " | " + ratios)
        sender.wait_idle()
        time.sleep(0.2)  # let the sender's poll thread drop to its idle interval
        print(
            f"idle CPU over 3 s: sender process {idle_cpu(sender.pid):.1f}%, "
            f"receiver process {idle_cpu(os.getpid()):.1f}% (100% = one core)"
        )
        # A region left un-acked keeps the sender polling at its fast interval: the busy-side cost.
        sender.call("put", 4096, 1)
        print(f"sender CPU with one region awaiting its ack (1 ms polling): {idle_cpu(sender.pid):.1f}%")
    finally:
        sender.stop()
        receiver.close()


if __name__ == "__main__":
    main()
