"""The encoder dies mid-transfer: its NIXL peer vanishes while (or before) llm_prefill READs its embedding.

The sender lives in a spawned child process (as the encoder stub does), the receiver in the test process; the
descriptor crosses a multiprocessing queue as JSON, as it crosses Triton. The child is SIGKILLed by its pid.

What must hold: fetch() raises PeerDisconnected naming the transfer and the sender (never returns data, never
hangs), quickly; the receiver's pool is back to empty and the dead peer is forgotten; a restarted sender with
the same agent name (new process, new metadata) is then served correctly by the same receiver.

Measured here (2-core host, UCX over CMA): the whole READ runs inside NIXL's ``transfer()`` call, ~160 ms for
512 MiB; killed ~10 ms into it, fetch() raised PeerDisconnected ~5 ms after the kill.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from mmtriton.transfer import EmbeddingDescriptor, EmbeddingReceiver, EmbeddingSender, PeerDisconnected

MiB = 1 << 20
# A spawned child imports torch + nixl: 2-4 s here, but over a minute was seen while a pipeline server started
# next door (load 27 on 2 cores). Only a slow child waits this long; a dead one is noticed at once.
SPAWN_TIMEOUT_S = 180
FETCH_TIMEOUT_S = 5.0  # the receiver's own bound; a dead peer must be reported well within it
BIG_SIZES = (512 * MiB, 1024 * MiB)  # the READ must outlast the kill; the second size is the one retry
KILL_DELAY_S = 0.01  # after the READ has begun: far less than it takes (>= ~50 ms even at 11 GB/s)
SMALL_SHAPE = (64, 96)
TAG = f"pd{os.getpid()}"


def small_tensor(seed: int) -> torch.Tensor:
    return torch.randn(SMALL_SHAPE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# The sender process (module level: spawn imports this module by name)


def _sender_proc(res_q: Any, cmd_q: Any) -> None:
    """Wait for ("create", name, pool_bytes, puts), create the sender, put each ("small", seed) / ("big",
    nbytes) embedding, hand the descriptors back, then wait for "exit"."""
    sender = None
    try:
        _, name, pool_bytes, puts = cmd_q.get(timeout=120)  # the test process vanished: do not linger
        sender = EmbeddingSender(name, pool_bytes, ack_timeout_s=30.0)
        texts = []
        for kind, arg in puts:
            # The big one's contents do not matter: torch.empty costs no memory until written (the pool is real).
            tensor = small_tensor(arg) if kind == "small" else torch.empty(arg // 4, dtype=torch.float32)
            texts.append(sender.put(tensor).to_json())
            del tensor
        res_q.put((os.getpid(), texts))
        cmd_q.get(timeout=120)
    except queue.Empty:
        pass
    if sender is not None:
        sender.close()


class SenderChild:
    """One encoder-like process; its sender is created on demand, so the process (whose torch + nixl imports
    take seconds) can be spawned ahead, e.g. as the replacement of a sender that is about to die."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.res_q, self.cmd_q = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_sender_proc, args=(self.res_q, self.cmd_q), daemon=True)
        self.proc.start()
        self.pid = self.proc.pid
        self.texts: list[str] = []

    def create(self, name: str, pool_bytes: int, puts: list[tuple[str, int]]) -> list[str]:
        """Create the sender named ``name`` and put ``puts``; returns their descriptors as JSON."""
        self.cmd_q.put(("create", name, pool_bytes, puts), timeout=5)
        t0 = time.monotonic()
        while True:
            try:
                pid, self.texts = self.res_q.get(timeout=0.5)
                break
            except queue.Empty:
                waited = time.monotonic() - t0
                if not self.proc.is_alive() or waited > SPAWN_TIMEOUT_S:
                    raise AssertionError(
                        f"sender child {self.pid} gave no descriptors in {waited:.0f}s "
                        f"(alive={self.proc.is_alive()}, exitcode={self.proc.exitcode})"
                    ) from None
        assert pid == self.pid
        return self.texts

    def sigkill(self) -> float:
        """SIGKILL this exact pid; returns the monotonic time just before the signal went out."""
        t = time.monotonic()
        os.kill(self.pid, signal.SIGKILL)
        return t

    def dead(self) -> bool:
        self.proc.join(10)
        return not self.proc.is_alive()


@pytest.fixture
def children() -> Iterator[list[SenderChild]]:
    """Sender processes, each told to exit (or killed) at the end of the test."""
    started: list[SenderChild] = []
    yield started
    for c in started:
        if c.proc.is_alive():
            c.cmd_q.put("exit", timeout=5)
    for c in started:
        c.proc.join(10)
        if c.proc.is_alive():
            c.sigkill()
            c.proc.join(10)


def spawn(children: list[SenderChild], n: int) -> list[SenderChild]:
    """Start ``n`` sender processes at once (their imports overlap)."""
    new = [SenderChild() for _ in range(n)]
    children.extend(new)
    return new


@dataclass
class ReadTrace:
    """When the receiver's NIXL READ began and when NIXL first reported it DONE (None: never)."""

    began: threading.Event = field(default_factory=threading.Event)
    began_at: float | None = None
    done_at: float | None = None


def trace_reads(monkeypatch: pytest.MonkeyPatch, receiver: EmbeddingReceiver) -> ReadTrace:
    """Time-stamp the real transfer()/check_xfer_state() calls of the receiver's agent (they still run).

    Over CMA the whole copy happens inside transfer(); over other transports it completes in later
    check_xfer_state() calls. Either way "DONE" is the moment the data had all arrived.
    """
    trace = ReadTrace()
    agent = receiver._agent
    real_transfer: Callable[[Any], str] = agent.transfer
    real_check: Callable[[Any], str] = agent.check_xfer_state

    def note(state: str) -> str:
        if state == "DONE" and trace.done_at is None:
            trace.done_at = time.monotonic()
        return state

    def transfer(handle: Any) -> str:
        trace.began_at = time.monotonic()
        trace.began.set()
        return note(real_transfer(handle))

    monkeypatch.setattr(agent, "transfer", transfer)
    monkeypatch.setattr(agent, "check_xfer_state", lambda handle: note(real_check(handle)))
    return trace


def assert_recovers(replacement: SenderChild, receiver: EmbeddingReceiver, name: str, seed: int) -> float:
    """A new process with the dead sender's agent name is served by the same receiver; returns seconds taken."""
    before = receiver.stats()
    (text,) = replacement.create(name, 4 * MiB, [("small", seed)])  # a new agent: new metadata, same name
    t0 = time.monotonic()
    got = receiver.fetch(text, timeout_s=FETCH_TIMEOUT_S)
    took = time.monotonic() - t0
    assert torch.equal(got, small_tensor(seed))
    assert name in receiver.peers()
    after = receiver.stats()
    # The dead peer had been forgotten, so the new one is a fresh add (not a replace of a stale entry).
    assert (after.peers_added - before.peers_added, after.fetches - before.fetches) == (1, 1)
    assert receiver.occupancy().regions_in_use == 0
    return took


def assert_clean_after_failure(receiver: EmbeddingReceiver, name: str, failures_before: int) -> None:
    occ, stats = receiver.occupancy(), receiver.stats()
    assert (occ.regions_in_use, occ.bytes_in_use) == (0, 0)  # the local region went back to the pool
    assert (stats.failures - failures_before, stats.timeouts, stats.quarantined_bytes) == (1, 0, 0)
    assert name not in receiver.peers()  # dropped, so a restarted sender of that name is loaded afresh


# ---------------------------------------------------------------------------------------------------------------


def _kill_during_read(
    child: SenderChild, monkeypatch: pytest.MonkeyPatch, name: str, big: int
) -> tuple[EmbeddingReceiver, dict[str, Any]] | None:
    """One attempt: kill the sender 10 ms into a READ of ``big`` bytes. None if the READ finished first."""
    receiver = EmbeddingReceiver(f"{TAG}-rcv-{big // MiB}", big + 4096)
    try:
        warm, doomed = child.create(name, big + 4 * MiB, [("small", 1), ("big", big)])
        # The encoder had served requests before: its peer is cached, so the fetch below is just the READ.
        assert torch.equal(receiver.fetch(warm, timeout_s=FETCH_TIMEOUT_S), small_tensor(1))
        failures_before = receiver.stats().failures
        trace = trace_reads(monkeypatch, receiver)
        outcome: dict[str, Any] = {}

        def fetch() -> None:
            try:
                outcome["data"] = receiver.fetch(doomed, timeout_s=FETCH_TIMEOUT_S)
            except BaseException as e:  # judged below
                outcome["error"] = e
            outcome["ended_at"] = time.monotonic()

        fetcher = threading.Thread(target=fetch, name="fetch-doomed", daemon=True)
        fetcher.start()
        deadline = time.monotonic() + FETCH_TIMEOUT_S + 5
        while not trace.began.wait(0.001) and fetcher.is_alive() and time.monotonic() < deadline:
            pass
        assert trace.began.is_set(), f"the READ never started: {outcome.get('error')!r}"
        time.sleep(KILL_DELAY_S)
        killed_at = child.sigkill()
        fetcher.join(FETCH_TIMEOUT_S + 5)
        assert not fetcher.is_alive(), "fetch() hung after its sender was killed"
        monkeypatch.undo()
        if trace.done_at is not None and trace.done_at <= killed_at:
            receiver.close()  # the READ beat the kill: this attempt proved nothing
            return None
        assert "data" not in outcome, "fetch() returned data from a sender killed mid-READ"
        err = outcome["error"]
        desc = EmbeddingDescriptor.from_json(doomed)
        assert isinstance(err, PeerDisconnected), repr(err)
        assert f"transfer {desc.transfer_id}" in str(err) and repr(name) in str(err) and "disconnected" in str(err)
        kill_to_error = outcome["ended_at"] - killed_at
        assert kill_to_error < FETCH_TIMEOUT_S
        assert child.dead()
        assert_clean_after_failure(receiver, name, failures_before)
        assert trace.began_at is not None
        return receiver, {"read_began_before_kill_s": killed_at - trace.began_at, "kill_to_error_s": kill_to_error}
    except BaseException:
        receiver.close()
        raise


def test_sender_killed_during_read_then_restarted(children: list[SenderChild], monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"{TAG}-enc-mid"
    original, replacement = spawn(children, 2)
    for i, big in enumerate(BIG_SIZES):
        attempt = _kill_during_read(original if i == 0 else spawn(children, 1)[0], monkeypatch, name, big)
        if attempt is not None:
            break
    else:
        pytest.fail(f"a READ of {BIG_SIZES[-1] // MiB} MiB finished within {KILL_DELAY_S}s: kill it sooner")
    receiver, figures = attempt
    try:
        figures["recovery_fetch_s"] = assert_recovers(replacement, receiver, name, seed=7)
    finally:
        receiver.close()
    print(f"\nkilled mid-READ of {big // MiB} MiB: {figures}")


@pytest.mark.parametrize("connected_first", [True, False], ids=["cached-peer", "unseen-peer"])
def test_sender_killed_before_fetch_then_restarted(children: list[SenderChild], connected_first: bool) -> None:
    name = f"{TAG}-enc-pre-{int(connected_first)}"
    with EmbeddingReceiver(f"{TAG}-rcv-pre", 16 * MiB) as receiver:
        original, replacement = spawn(children, 2)
        warm, doomed = original.create(name, 16 * MiB, [("small", 2), ("big", 8 * MiB)])
        if connected_first:
            assert torch.equal(receiver.fetch(warm, timeout_s=FETCH_TIMEOUT_S), small_tensor(2))
        failures_before = receiver.stats().failures
        original.sigkill()
        assert original.dead()
        desc = EmbeddingDescriptor.from_json(doomed)
        t0 = time.monotonic()
        with pytest.raises(PeerDisconnected, match=f"transfer {desc.transfer_id}.*'{name}'") as caught:
            receiver.fetch(doomed, timeout_s=FETCH_TIMEOUT_S)
        took = time.monotonic() - t0
        # PeerDisconnected (not TimeoutError) already says it was not the timeout; ~1-2 ms measured.
        assert took < FETCH_TIMEOUT_S / 2, f"a dead sender took {took:.2f}s to report"
        assert_clean_after_failure(receiver, name, failures_before)
        recovery = assert_recovers(replacement, receiver, name, seed=8)
    print(
        f"\nkilled before fetch ({'cached' if connected_first else 'unseen'} peer): error after {took * 1e3:.1f} ms "
        f"({caught.value}); restarted sender fetched in {recovery * 1e3:.1f} ms"
    )
