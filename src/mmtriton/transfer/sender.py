"""The encoder side: :class:`EmbeddingSender` publishes embeddings from one pre-registered pool."""

from __future__ import annotations

import base64
import ctypes
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from mmtriton.transfer.agent import ACK_PREFIX, _create_agent, _register
from mmtriton.transfer.descriptor import DTYPE_NAMES, DTYPES, EmbeddingDescriptor
from mmtriton.transfer.errors import PoolFull
from mmtriton.transfer.pool import (
    DEFAULT_ALIGNMENT,
    TAG_BYTES,
    Occupancy,
    RegionAllocator,
    _byte_view,
    _copy_bytes,
    _tag,
)

log = logging.getLogger("mmtriton.transfer")  # one logger for the package, as when it was one module


@dataclass(frozen=True)
class SenderStats:
    puts: int = 0
    acks: int = 0
    expired: int = 0
    late_acks: int = 0  # acks for regions already reclaimed by expiry (ack_timeout_s too short?)
    pool_full: int = 0
    poll_errors: int = 0


@dataclass
class _Outstanding:
    offset: int
    nbytes: int
    deadline: float


class EmbeddingSender:
    """Publishes embeddings from one pre-registered pool; regions are freed by the reader's ack or by expiry.

    Thread-safe: ``put()`` may be called from several threads. The NIXL agent is only touched by the poll
    thread started here, which receives acks and reclaims expired regions.
    """

    def __init__(
        self,
        name: str,
        pool_bytes: int,
        ack_timeout_s: float = 60.0,
        *,
        alignment: int = DEFAULT_ALIGNMENT,
        poll_interval_s: float = 0.001,
        idle_poll_interval_s: float = 0.05,
        net_devices: str | None = None,
        error_handling: str = "none",
    ) -> None:
        if ack_timeout_s <= 0:
            raise ValueError(f"ack_timeout_s must be positive, got {ack_timeout_s}")
        self.name = name
        self.ack_timeout_s = ack_timeout_s
        self._poll_s = poll_interval_s
        self._idle_poll_s = idle_poll_interval_s
        self._alloc = RegionAllocator(pool_bytes, alignment)
        self._lock = threading.Lock()
        self._outstanding: dict[str, _Outstanding] = {}
        self._counts = {f.name: 0 for f in fields(SenderStats)}
        self._closed = False
        # zeros, not empty: fault the pages in now rather than on the first large put.
        self._pool = torch.zeros(pool_bytes, dtype=torch.uint8)
        self._agent = _create_agent(name, net_devices, error_handling)
        self._reg = _register(self._agent, self._pool)
        # Stable for the agent's life: memory is registered once, before the metadata is taken.
        self._metadata_b64 = base64.b64encode(self._agent.get_agent_metadata()).decode("ascii")
        self._base = self._pool.data_ptr()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name=f"nixl-sender-{name}", daemon=True)
        self._thread.start()

    # -- public ---------------------------------------------------------------------------------------------

    def put(self, tensor: torch.Tensor, extra: Mapping[str, Any] | None = None) -> EmbeddingDescriptor:
        """Copy ``tensor`` into the pool; the returned descriptor is valid until acked or ``ack_timeout_s``."""
        if self._closed:
            raise RuntimeError(f"EmbeddingSender {self.name!r} is closed")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"put() takes a torch.Tensor, got {type(tensor).__name__}")
        dtype = DTYPE_NAMES.get(tensor.dtype)
        if dtype is None:
            raise ValueError(f"dtype {tensor.dtype} cannot be transferred (allowed: {', '.join(DTYPES)})")
        extra = dict(extra or {})
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise ValueError(f"extra must be JSON-serialisable: {e}") from None
        nbytes = tensor.numel() * tensor.element_size()
        tid = uuid.uuid4().hex
        offset = 0
        if nbytes:
            with self._lock:
                self._reclaim_expired_locked(time.monotonic())
                off = self._alloc.allocate(nbytes + TAG_BYTES)
                if off is None:
                    self._counts["pool_full"] += 1
                    raise PoolFull(
                        f"sender {self.name!r}: no free region for {nbytes} bytes (pool {self._alloc.capacity}, "
                        f"in use {self._alloc.bytes_used} in {self._alloc.regions_used} regions, largest free "
                        f"{self._alloc.largest_free}); receivers are not acking or ack_timeout_s is too long"
                    )
                offset = off
            try:
                # Copy outside the lock: up to ~100 MB, and other puts need not wait for it.
                _copy_bytes(self._pool[offset : offset + nbytes], _byte_view(tensor.detach().contiguous()))
                ctypes.memmove(self._base + offset + nbytes, _tag(tid), TAG_BYTES)
            except BaseException:
                with self._lock:
                    self._alloc.free(offset)
                raise
            with self._lock:
                # The clock starts when the descriptor is handed out, not before the copy.
                self._outstanding[tid] = _Outstanding(offset, nbytes, time.monotonic() + self.ack_timeout_s)
                self._counts["puts"] += 1
            self._wake.set()  # switch the poll thread to its fast interval
        else:
            with self._lock:
                self._counts["puts"] += 1  # empty tensors need no region and no ack
        return EmbeddingDescriptor(
            transfer_id=tid,
            agent=self.name,
            agent_metadata=self._metadata_b64,
            addr=self._base + offset,
            nbytes=nbytes,
            shape=tuple(tensor.shape),
            dtype=dtype,
            extra=extra,
        )

    def occupancy(self) -> Occupancy:
        with self._lock:
            return Occupancy(self._alloc.bytes_used, self._alloc.regions_used, self._alloc.capacity)

    def stats(self) -> SenderStats:
        with self._lock:
            return SenderStats(**self._counts)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the poll thread, then deregister and drop the pool (in that order: peers may still READ it)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            # Still inside a NIXL call: tearing the agent down under it would crash; leak it instead.
            log.warning(
                "sender %s: poll thread did not stop within %.1fs; leaving the agent alive", self.name, timeout_s
            )
            return
        try:
            self._agent.deregister_memory(self._reg)
        except Exception as e:  # best effort at shutdown
            log.warning("sender %s: deregistering the pool failed: %s", self.name, e)
        # Drop the agent but keep the pool until this object dies: memory must outlive every handle that
        # could reach it, and a put() racing close() may still be copying into it.
        self._agent = None

    def __enter__(self) -> EmbeddingSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def withdraw(self, transfer_id: str) -> None:
        """Free a region whose descriptor was never handed to a reader (its request failed first)."""
        with self._lock:
            o = self._outstanding.pop(transfer_id, None)
            if o is not None:
                self._release_locked(o)

    # -- internals ------------------------------------------------------------------------------------------

    def _release_locked(self, o: _Outstanding) -> None:
        # Wipe the tag first: a READ of this descriptor from now on (late, or repeated) must not pass as valid.
        ctypes.memset(self._base + o.offset + o.nbytes, 0, TAG_BYTES)
        self._alloc.free(o.offset)

    def _reclaim_expired_locked(self, now: float) -> None:
        expired = [tid for tid, o in self._outstanding.items() if o.deadline <= now]
        for tid in expired:
            o = self._outstanding.pop(tid)
            self._release_locked(o)
            self._counts["expired"] += 1
            log.warning(
                "sender %s: transfer %s (%d bytes) was not acked in %.1fs; region reclaimed",
                self.name,
                tid,
                o.nbytes,
                self.ack_timeout_s,
            )

    def _handle_notifs(self, notifs: Mapping[str, list[bytes]]) -> None:
        with self._lock:
            for msgs in notifs.values():
                for msg in msgs:
                    if not msg.startswith(ACK_PREFIX):
                        continue
                    tid = msg[len(ACK_PREFIX) :].decode("ascii", "replace")
                    o = self._outstanding.pop(tid, None)
                    if o is None:
                        self._counts["late_acks"] += 1
                        continue
                    self._release_locked(o)
                    self._counts["acks"] += 1

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            # Clear before looking at the state: a put() that lands after this is never missed by wait().
            self._wake.clear()
            try:
                # get_new_notifs() also drives UCX progress, which TCP READs from this pool depend on.
                notifs = self._agent.get_new_notifs()
                if notifs:
                    self._handle_notifs(notifs)
                with self._lock:
                    if self._outstanding:
                        self._reclaim_expired_locked(time.monotonic())
                    busy = bool(self._outstanding)
            except Exception:
                log.exception("sender %s: notification poll failed", self.name)
                with self._lock:
                    self._counts["poll_errors"] += 1
                busy = False
            self._wake.wait(self._poll_s if busy else self._idle_poll_s)
