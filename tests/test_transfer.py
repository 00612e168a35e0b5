"""Embedding transfer over NIXL (mmtriton.transfer): descriptors, pools, acks, expiry, failures.

Senders run in spawned child processes (as the encoder stub would), the receiver in the test process; the
descriptor travels over a multiprocessing queue as JSON, exactly as it would travel through Triton.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import multiprocessing as mp
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from mmtriton.transfer import (
    EmbeddingDescriptor,
    EmbeddingReceiver,
    EmbeddingSender,
    PeerDisconnected,
    PoolFull,
    RegionAllocator,
    TransferError,
    TransferExpired,
)

CALL_TIMEOUT_S = 60  # spawning a child imports torch + nixl: seconds on a loaded 2-core box
MiB = 1 << 20
TAG = f"t{os.getpid()}"


# ---------------------------------------------------------------------------------------------------------------
# Child process (module level: the spawn start method imports this module by name)


def make_tensor(shape: tuple[int, ...], dtype: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(getattr(torch, dtype))


def _sender_proc(cmd_q: Any, res_q: Any, env: dict[str, str]) -> None:
    os.environ.update(env)
    senders: dict[str, EmbeddingSender] = {}
    res_q.put(("ok", os.getpid()))
    while True:
        try:
            cmd, *args = cmd_q.get(timeout=300)  # the test process vanished: do not linger
        except queue.Empty:
            break
        try:
            out: Any = None
            if cmd == "create":
                name, pool_bytes, ack_timeout_s = args
                senders[name] = EmbeddingSender(name, pool_bytes, ack_timeout_s=ack_timeout_s)
            elif cmd == "put":
                name, shape, dtype, seed, extra = args
                out = senders[name].put(make_tensor(tuple(shape), dtype, seed), extra).to_json()
            elif cmd == "state":
                out = (dataclasses.asdict(senders[args[0]].occupancy()), dataclasses.asdict(senders[args[0]].stats()))
            elif cmd == "close":
                senders.pop(args[0]).close()
            elif cmd == "exit":
                break
            res_q.put(("ok", out))
        except Exception as e:
            res_q.put(("err", f"{type(e).__name__}: {e}"))
    for s in senders.values():
        s.close()


class Child:
    """A sender process driven over queues; every wait is bounded."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.cmd_q, self.res_q = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_sender_proc, args=(self.cmd_q, self.res_q, env or {}), daemon=True)
        self.proc.start()
        self.pid = self._result()

    def _result(self) -> Any:
        status, out = self.res_q.get(timeout=CALL_TIMEOUT_S)
        if status == "err":
            raise RuntimeError(f"sender child: {out}")
        return out

    def call(self, cmd: str, *args: Any) -> Any:
        self.cmd_q.put((cmd, *args))
        return self._result()

    def put(self, name: str, shape: tuple[int, ...], dtype: str, seed: int, extra: dict | None = None) -> str:
        return self.call("put", name, list(shape), dtype, seed, extra or {})

    def state(self, name: str) -> tuple[dict, dict]:
        return self.call("state", name)

    def wait_idle(self, name: str, timeout_s: float = 5.0) -> tuple[dict, dict]:
        """Poll the child's occupancy until no region is in use (acks are asynchronous)."""
        deadline = time.monotonic() + timeout_s
        occ, stats = self.state(name)
        while occ["regions_in_use"] and time.monotonic() < deadline:
            time.sleep(0.01)
            occ, stats = self.state(name)
        return occ, stats

    def stop(self) -> None:
        if self.proc.is_alive():
            with_timeout_put(self.cmd_q, ("exit",))
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)


def proc_state(pid: int) -> str:
    """The one-letter state of a process (R, S, T for stopped, ...) from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def with_timeout_put(q: Any, item: Any) -> None:
    q.put(item, timeout=5)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    )


def count_calls(monkeypatch: pytest.MonkeyPatch, obj: Any, method: str) -> list[int]:
    """Wrap obj.method so each real call is counted; returns a one-element counter."""
    counter = [0]
    real: Callable[..., Any] = getattr(obj, method)

    def wrapper(*a: Any, **kw: Any) -> Any:
        counter[0] += 1
        return real(*a, **kw)

    monkeypatch.setattr(obj, method, wrapper)
    return counter


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def child() -> Iterator[Child]:
    c = Child()
    c.call("create", "enc", 128 * MiB, 30.0)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[EmbeddingReceiver]:
    r = EmbeddingReceiver(f"{TAG}-rcv", 128 * MiB)
    yield r
    r.close()


# ---------------------------------------------------------------------------------------------------------------
# Descriptor

FAKE_MD = base64.b64encode(b"not really nixl metadata").decode()


def good_desc(**kw: Any) -> EmbeddingDescriptor:
    base: dict[str, Any] = dict(
        transfer_id="abc",
        agent="enc",
        agent_metadata=FAKE_MD,
        addr=4096,
        nbytes=2 * 3 * 2,
        shape=(2, 3),
        dtype="bfloat16",
        extra={"image_grid_thw": [[1, 4, 6]], "family": "qwen2_vl"},
    )
    base.update(kw)
    return EmbeddingDescriptor(**base)


def test_descriptor_json_round_trip() -> None:
    d = good_desc()
    text = d.to_json()
    assert json.loads(text)["shape"] == [2, 3]
    back = EmbeddingDescriptor.from_json(text)
    assert back == d
    assert back.extra["image_grid_thw"] == [[1, 4, 6]]
    assert EmbeddingDescriptor.from_json(text.encode()) == d


def _mutated(**changes: Any) -> str:
    d = good_desc().to_dict()
    for k, v in changes.items():
        if v is KeyError:
            del d[k]
        else:
            d[k] = v
    return json.dumps(d)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        (_mutated(nbytes=KeyError), "missing field.*nbytes"),
        (_mutated(agent_metadata=KeyError, dtype=KeyError), "missing field.*agent_metadata, dtype"),
        (_mutated(nbytes=-12), "nbytes must be a non-negative integer"),
        (_mutated(addr=-1), "addr must be a non-negative integer"),
        (_mutated(nbytes=True), "nbytes must be a non-negative integer"),
        (_mutated(shape=[2, -3]), "shape must be a list of non-negative integers"),
        (_mutated(shape="2x3"), "shape must be a list"),
        (_mutated(dtype="complex64"), "unknown dtype 'complex64'"),
        (_mutated(nbytes=13), r"nbytes 13 != prod\(shape"),
        (_mutated(dtype="float32"), r"nbytes 12 != .* = 24"),
        (_mutated(agent_metadata="%%%not-base64"), "not valid base64"),
        (_mutated(transfer_id=""), "transfer_id must be a non-empty string"),
        (_mutated(extra=[1]), "extra must be an object"),
        (_mutated(surprise=1), "unknown field.*surprise"),
    ],
)
def test_descriptor_validation_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EmbeddingDescriptor.from_json(text)


def test_allocator_first_fit_alignment_and_coalescing() -> None:
    a = RegionAllocator(4096, alignment=256)
    x, y, z = a.allocate(1), a.allocate(300), a.allocate(256)
    assert (x, y, z) == (0, 256, 768)  # sizes rounded up to the alignment
    assert a.bytes_used == 1024 and a.regions_used == 3
    a.free(y)
    assert a.allocate(512) == 256  # first fit reuses the hole
    a.free(256)
    a.free(x)
    a.free(z)
    assert a.bytes_used == 0 and a.largest_free == 4096  # all holes merged back into one block
    assert a.allocate(4097) is None


def _non_loopback_ipv4() -> dict[str, bytes]:
    import psutil

    return {
        name: socket.inet_aton(a.address)
        for name, addrs in psutil.net_if_addrs().items()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    }


def test_loopback_by_default_other_interfaces_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our agents advertise only loopback unless asked; UCX_NET_DEVICES is left as the user had it."""
    ips = _non_loopback_ipv4()
    if not ips:
        pytest.skip("no non-loopback IPv4 interface on this host")
    iface, ip = next(iter(ips.items()))

    def advertised(**kw: Any) -> bool:
        with EmbeddingSender(f"{TAG}-net", 4096, **kw) as s:
            return ip in base64.b64decode(s.put(torch.ones(1)).agent_metadata)

    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    assert not advertised()
    assert "UCX_NET_DEVICES" not in os.environ  # set only while the agent was created
    assert advertised(net_devices=iface)
    monkeypatch.setenv("UCX_NET_DEVICES", iface)  # the user's choice wins over our loopback default
    assert advertised()
    assert os.environ["UCX_NET_DEVICES"] == iface


# ---------------------------------------------------------------------------------------------------------------
# Two processes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_process_bit_identical_and_acked(child: Child, receiver: EmbeddingReceiver, dtype: str) -> None:
    shapes = [(1, 8), (257, 33), (1024, 1536), (2048, 3584), (3,), (0, 16)]
    _, before = child.state("enc")
    for seed, shape in enumerate(shapes):
        extra = {"image_grid_thw": [[1, 2 * seed + 2, 4]]}
        text = child.put("enc", shape, dtype, seed, extra)
        desc = EmbeddingDescriptor.from_json(text)
        got = receiver.fetch(text, timeout_s=20)
        assert same_bits(got, make_tensor(shape, dtype, seed)), (dtype, shape)
        assert desc.extra == extra
        occ, stats = child.wait_idle("enc")
        assert occ["regions_in_use"] == 0 and occ["bytes_in_use"] == 0, (shape, occ)
    # Every non-empty put was acked by the receiver, none expired.
    assert stats["puts"] - before["puts"] == len(shapes)
    assert stats["acks"] - before["acks"] == len(shapes) - 1
    assert stats["expired"] == before["expired"]


def test_fetch_into_caller_buffer(child: Child, receiver: EmbeddingReceiver) -> None:
    text = child.put("enc", (300, 64), "bfloat16", 11)
    with pytest.raises(ValueError, match=r"out must be a contiguous CPU bfloat16 tensor of shape \[300, 64\]"):
        receiver.fetch(text, out=torch.empty(64, 300, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        receiver.fetch(text, out=torch.empty(300, 64, dtype=torch.float32))
    with pytest.raises(ValueError, match="out must be"):
        receiver.fetch(text, out=torch.empty(64, 300, dtype=torch.bfloat16).t())  # right shape, not contiguous
    buf = torch.empty(300, 64, dtype=torch.bfloat16)
    got = receiver.fetch(text, timeout_s=20, out=buf)
    assert got is buf and same_bits(buf, make_tensor((300, 64), "bfloat16", 11))
    assert child.wait_idle("enc")[0]["regions_in_use"] == 0
    # The ack wiped the region's tag: fetching the same descriptor again is refused, not served stale.
    with pytest.raises(TransferExpired, match="no longer holds it"):
        receiver.fetch(text, timeout_s=20)


def test_several_in_flight_concurrent_fetch_and_reuse(child: Child, receiver: EmbeddingReceiver) -> None:
    specs = [((512, 1024), "float32", 100 + i) for i in range(6)]
    texts = [child.put("enc", *s) for s in specs]
    descs = [EmbeddingDescriptor.from_json(t) for t in texts]
    occ, _ = child.state("enc")
    assert occ["regions_in_use"] == 6
    assert len({d.addr for d in descs}) == 6  # distinct regions while in flight

    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def worker(indices: list[int]) -> None:
        try:
            for i in indices:
                results[i] = receiver.fetch(texts[i], timeout_s=20)
        except BaseException as e:  # surfaced below
            errors.append(e)

    # Two threads, out of order, as Triton's execute thread and an asyncio thread would.
    threads = [threading.Thread(target=worker, args=(idx,)) for idx in ([5, 3, 1], [0, 2, 4])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 6
    for i, (shape, dtype, seed) in enumerate(specs):
        assert same_bits(results[i], make_tensor(shape, dtype, seed))
    occ, _ = child.wait_idle("enc")
    assert occ["regions_in_use"] == 0
    # First fit after all acks: the next put lands where the first one did.
    again = EmbeddingDescriptor.from_json(child.put("enc", (512, 1024), "float32", 7))
    assert again.addr == min(d.addr for d in descs)
    assert same_bits(receiver.fetch(again, timeout_s=20), make_tensor((512, 1024), "float32", 7))
    child.wait_idle("enc")


def test_pool_full_until_acked(child: Child, receiver: EmbeddingReceiver) -> None:
    child.call("create", "small", 1 * MiB, 30.0)
    try:
        texts = [child.put("small", (300 * 1024,), "uint8", i) for i in range(3)]
        with pytest.raises(RuntimeError, match="PoolFull.*no free region for 307200 bytes"):
            child.put("small", (300 * 1024,), "uint8", 3)
        occ, stats = child.state("small")
        assert occ["regions_in_use"] == 3 and stats["pool_full"] == 1
        receiver.fetch(texts[1], timeout_s=20)
        deadline = time.monotonic() + 5
        while child.state("small")[0]["regions_in_use"] != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        text = child.put("small", (300 * 1024,), "uint8", 3)  # the acked region is reused
        assert EmbeddingDescriptor.from_json(text).addr == EmbeddingDescriptor.from_json(texts[1]).addr
        for t in (texts[0], texts[2], text):
            receiver.fetch(t, timeout_s=20)
        occ, stats = child.wait_idle("small")
        assert occ["regions_in_use"] == 0 and stats["acks"] == 4
    finally:
        child.call("close", "small")


def test_expiry_reclaims_unacked_regions_and_late_readers_are_refused() -> None:
    n = 16 * 1024  # float32 elements: 64 KiB, which with its tag fills the pool
    with (
        EmbeddingSender(f"{TAG}-exp", 64 * 1024 + 256, ack_timeout_s=0.3) as s,
        EmbeddingReceiver(f"{TAG}-exp-rcv", 1 * MiB) as r,
    ):
        first = s.put(torch.zeros(n, dtype=torch.float32))
        with pytest.raises(PoolFull, match="no free region for 4 bytes"):
            s.put(torch.zeros(1, dtype=torch.float32))
        assert s.occupancy().regions_in_use == 1
        deadline = time.monotonic() + 5
        while s.occupancy().regions_in_use and time.monotonic() < deadline:
            time.sleep(0.01)
        # The poll thread reclaimed it without any ack, and counted it.
        assert s.occupancy().regions_in_use == 0
        assert s.stats().expired == 1 and s.stats().acks == 0
        # A reader that comes after expiry gets an error, not whatever the region holds now ...
        with pytest.raises(TransferExpired, match=first.transfer_id):
            r.fetch(first, timeout_s=5)
        # ... also once the region has been reused by a new put, which itself reads fine and is acked.
        again = s.put(torch.ones(n, dtype=torch.float32))
        assert again.addr == first.addr
        with pytest.raises(TransferExpired):
            r.fetch(first, timeout_s=5)
        assert torch.equal(r.fetch(again, timeout_s=5), torch.ones(n))
        deadline = time.monotonic() + 5
        while s.occupancy().regions_in_use and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.stats().acks == 1 and s.stats().expired == 1 and s.occupancy().bytes_in_use == 0


def test_tampered_descriptor_refused_before_any_transfer(
    child: Child, receiver: EmbeddingReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = child.put("enc", (64, 32), "float32", 42)
    desc = EmbeddingDescriptor.from_json(text)
    small = EmbeddingReceiver(f"{TAG}-small-rcv", 4096, allowed_dtypes=("bfloat16",))
    try:
        calls = {
            (r.name, m): count_calls(monkeypatch, r._agent, m)
            for r in (receiver, small)
            for m in ("add_remote_agent", "initialize_xfer")
        }
        with pytest.raises(ValueError, match="nbytes 8196 != prod"):
            receiver.fetch(dataclasses.replace(desc, nbytes=desc.nbytes + 4))
        with pytest.raises(ValueError, match="nbytes 8192 != .* bfloat16"):
            receiver.fetch(dataclasses.replace(desc, dtype="bfloat16"))
        with pytest.raises(ValueError, match="unknown dtype 'float8'"):
            receiver.fetch(dataclasses.replace(desc, dtype="float8"))
        with pytest.raises(ValueError, match="dtype float32 not allowed here"):
            small.fetch(desc)
        with pytest.raises(ValueError, match=r"8192 bytes \(\+16 tag\) exceed this receiver's pool of 4096"):
            small.fetch(dataclasses.replace(desc, dtype="bfloat16", shape=(64, 64)))
        assert all(c[0] == 0 for c in calls.values()), calls
        # Genuine descriptor still works, and a pointer outside the sender's registered pool is a clear
        # error from NIXL, not a crash or a read of arbitrary memory.
        assert same_bits(receiver.fetch(text, timeout_s=20), make_tensor((64, 32), "float32", 42))
        with pytest.raises(TransferError, match="failed"):
            receiver.fetch(dataclasses.replace(desc, addr=desc.addr + (1 << 40)), timeout_s=5)
        # Pointing at another live region of the sender's pool is caught by the region's tag.
        other = EmbeddingDescriptor.from_json(child.put("enc", (64, 32), "float32", 43))
        with pytest.raises(TransferExpired, match="descriptor was altered"):
            receiver.fetch(dataclasses.replace(desc, addr=other.addr), timeout_s=5)
        assert same_bits(receiver.fetch(other, timeout_s=20), make_tensor((64, 32), "float32", 43))
    finally:
        small.close()
    child.wait_idle("enc")


def test_peers_are_cached_and_a_restarted_sender_is_reloaded(
    child: Child, receiver: EmbeddingReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    child.call("create", "peer", 4 * MiB, 30.0)
    adds = count_calls(monkeypatch, receiver._agent, "add_remote_agent")
    removes = count_calls(monkeypatch, receiver._agent, "remove_remote_agent")
    before = receiver.stats()
    for i in range(5):
        receiver.fetch(child.put("peer", (16, 16), "float32", i), timeout_s=20)
    assert adds[0] == 1 and removes[0] == 0  # loaded once, not per request
    assert "peer" in receiver.peers()

    # Same name, new process-level identity: a new agent (new metadata) replaces the cached one.
    child.call("close", "peer")
    child.call("create", "peer", 4 * MiB, 30.0)
    got = receiver.fetch(child.put("peer", (16, 16), "float32", 99), timeout_s=20)
    assert same_bits(got, make_tensor((16, 16), "float32", 99))
    assert adds[0] == 2 and removes[0] == 1
    after = receiver.stats()
    assert after.peers_added - before.peers_added == 2 and after.peers_replaced - before.peers_replaced == 1
    child.wait_idle("peer")
    child.call("close", "peer")


@pytest.mark.parametrize("connected_first", [True, False])
def test_dead_sender_raises_quickly(receiver: EmbeddingReceiver, connected_first: bool) -> None:
    c = Child()
    try:
        c.call("create", "doomed", 4 * MiB, 30.0)
        if connected_first:
            receiver.fetch(c.put("doomed", (8, 8), "float32", 1), timeout_s=20)
        text = c.put("doomed", (256, 256), "float32", 2)
        c.kill()
        c.proc.join(10)
        assert not c.proc.is_alive()
        t0 = time.monotonic()
        with pytest.raises((PeerDisconnected, TimeoutError), match="doomed"):
            receiver.fetch(text, timeout_s=10)
        assert time.monotonic() - t0 < 5
        assert "doomed" not in receiver.peers()  # forgotten, so a restarted "doomed" is loaded afresh
        assert receiver.occupancy().regions_in_use == 0
    finally:
        c.stop()


def test_tcp_transport_served_by_poll_thread_and_stalled_sender_times_out() -> None:
    """Over TCP the sender must make UCX progress for a READ to complete: its poll thread does; a stopped
    sender makes fetch() raise TimeoutError naming the transfer instead of hanging."""
    c = Child(env={"UCX_TLS": "tcp,self"})
    r = EmbeddingReceiver(f"{TAG}-tcp-rcv", 16 * MiB)
    try:
        c.call("create", "tcp", 16 * MiB, 30.0)
        text = c.put("tcp", (1024, 1024), "bfloat16", 5)
        assert same_bits(r.fetch(text, timeout_s=20), make_tensor((1024, 1024), "bfloat16", 5))
        stalled = EmbeddingDescriptor.from_json(c.put("tcp", (1024, 1024), "float32", 6))
        c.kill(signal.SIGSTOP)
        deadline = time.monotonic() + 5  # SIGSTOP lands asynchronously: wait until the child is stopped
        while proc_state(c.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc_state(c.pid) == "T"
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=f"transfer {stalled.transfer_id}"):
            r.fetch(stalled, timeout_s=0.5)
        assert time.monotonic() - t0 < 3
        assert r.stats().timeouts == 1
        # The READ was cancelled and its region freed, or (if NIXL could not cancel it) kept out of use.
        assert r.occupancy().bytes_in_use == r.stats().quarantined_bytes
    finally:
        if c.proc.is_alive():
            c.kill(signal.SIGCONT)
        c.stop()
        r.close()
