"""The LLM side: :class:`EmbeddingReceiver` READs embeddings into its own pool and acks them."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

import torch

from mmtriton.transfer.agent import ACK_PREFIX, _create_agent, _is_disconnect, _register
from mmtriton.transfer.descriptor import DTYPES, EmbeddingDescriptor
from mmtriton.transfer.errors import PeerDisconnected, PoolFull, TransferError, TransferExpired, _UncancelledTimeout
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
class ReceiverStats:
    fetches: int = 0
    bytes_fetched: int = 0
    peers_added: int = 0
    peers_replaced: int = 0
    failures: int = 0
    timeouts: int = 0
    quarantined_bytes: int = 0  # local regions never reused: a timed-out READ could not be cancelled


class EmbeddingReceiver:
    """Fetches embeddings from senders into its own pre-registered pool and returns fresh tensors.

    Thread-safe: ``fetch()`` may run concurrently from several threads; peers are cached by agent name and
    loaded once (again only when a sender restarted, i.e. its metadata changed).
    """

    def __init__(
        self,
        name: str,
        pool_bytes: int,
        *,
        alignment: int = DEFAULT_ALIGNMENT,
        allowed_dtypes: tuple[str, ...] | None = None,
        net_devices: str | None = None,
        error_handling: str = "none",
    ) -> None:
        self.name = name
        self.pool_bytes = pool_bytes
        self.allowed_dtypes = tuple(allowed_dtypes) if allowed_dtypes is not None else tuple(DTYPES)
        unknown = [d for d in self.allowed_dtypes if d not in DTYPES]
        if unknown:
            raise ValueError(f"unknown dtype(s) in allowed_dtypes: {unknown}")
        self._alloc = RegionAllocator(pool_bytes, alignment)
        self._alloc_cv = threading.Condition()
        self._nixl_lock = threading.Lock()  # NIXL agents here are NIXL_THREAD_SYNC_NONE
        self._peers: dict[str, bytes] = {}  # agent name -> metadata it was loaded with
        self._counts = {f.name: 0 for f in fields(ReceiverStats)}
        self._closed = False
        self._pool = torch.zeros(pool_bytes, dtype=torch.uint8)
        self._agent = _create_agent(name, net_devices, error_handling)
        self._reg = _register(self._agent, self._pool)
        self._base = self._pool.data_ptr()

    # -- public ---------------------------------------------------------------------------------------------

    def check(self, desc: EmbeddingDescriptor) -> None:
        """Refuse a descriptor this receiver cannot or will not serve, before any NIXL call."""
        desc.validate()
        if desc.dtype not in self.allowed_dtypes:
            raise ValueError(
                f"transfer {desc.transfer_id}: dtype {desc.dtype} not allowed here "
                f"(allowed: {', '.join(self.allowed_dtypes)})"
            )
        if desc.nbytes + TAG_BYTES > self.pool_bytes:
            raise ValueError(
                f"transfer {desc.transfer_id}: {desc.nbytes} bytes (+{TAG_BYTES} tag) exceed this receiver's "
                f"pool of {self.pool_bytes} bytes"
            )
        desc.metadata_bytes()

    def fetch(
        self, desc: EmbeddingDescriptor | str, timeout_s: float = 30.0, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """READ the embedding ``desc`` points at, ack it, and return it as a new tensor (or in ``out``).

        ``out``, when given, must be a contiguous CPU tensor of the descriptor's shape and dtype: a caller
        that already owns the destination (a model input buffer) saves the allocation and page faults of a
        fresh tensor, which dominate fetch() from ~1 MiB up.

        Raises ValueError for a bad descriptor (before any NIXL call), TimeoutError when the transfer (or a
        free local region) does not come within ``timeout_s``, PeerDisconnected when the sender is gone,
        TransferExpired when the sender already reclaimed the region (or the descriptor was already fetched),
        TransferError otherwise.
        """
        if self._closed:
            raise RuntimeError(f"EmbeddingReceiver {self.name!r} is closed")
        if isinstance(desc, str | bytes):
            desc = EmbeddingDescriptor.from_json(desc)
        self.check(desc)
        dtype = DTYPES[desc.dtype]
        if out is None:
            out = torch.empty(desc.shape, dtype=dtype)
        elif (
            out.dtype != dtype or tuple(out.shape) != desc.shape or out.device.type != "cpu" or not out.is_contiguous()
        ):
            raise ValueError(
                f"transfer {desc.transfer_id}: out must be a contiguous CPU {desc.dtype} tensor of shape "
                f"{list(desc.shape)}, got {out.dtype} {list(out.shape)} on {out.device}"
            )
        if desc.nbytes == 0:
            return out
        deadline = time.monotonic() + timeout_s
        offset = self._reserve(desc, deadline)
        reuse_region = True
        try:
            self._read(desc, offset, deadline)
            if ctypes.string_at(self._base + offset + desc.nbytes, TAG_BYTES) != _tag(desc.transfer_id):
                raise TransferExpired(
                    f"transfer {desc.transfer_id} from {desc.agent!r}: the sender's region no longer holds it "
                    "(not acked within the sender's ack_timeout_s, so reclaimed), or the descriptor was altered"
                )
            _copy_bytes(_byte_view(out), self._pool[offset : offset + desc.nbytes])
        except BaseException as e:
            # A READ NIXL could not cancel may still land in our region: never hand it out again.
            reuse_region = not isinstance(e, _UncancelledTimeout)
            with self._alloc_cv:
                self._counts["failures"] += 1
            raise
        finally:
            if reuse_region:
                with self._alloc_cv:
                    self._alloc.free(offset)
                    self._alloc_cv.notify_all()
        self._ack(desc)
        with self._alloc_cv:
            self._counts["fetches"] += 1
            self._counts["bytes_fetched"] += desc.nbytes
        return out

    def peers(self) -> list[str]:
        with self._nixl_lock:
            return sorted(self._peers)

    def occupancy(self) -> Occupancy:
        with self._alloc_cv:
            return Occupancy(self._alloc.bytes_used, self._alloc.regions_used, self._alloc.capacity)

    def stats(self) -> ReceiverStats:
        with self._alloc_cv:
            return ReceiverStats(**self._counts)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._nixl_lock:
            for peer in list(self._peers):
                with contextlib.suppress(Exception):
                    self._agent.remove_remote_agent(peer)
            self._peers.clear()
            try:
                self._agent.deregister_memory(self._reg)
            except Exception as e:
                log.warning("receiver %s: deregistering the pool failed: %s", self.name, e)
            self._agent = None  # the pool goes with this object, after the agent

    def __enter__(self) -> EmbeddingReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------------------

    def _reserve(self, desc: EmbeddingDescriptor, deadline: float) -> int:
        # Our pool only holds in-flight fetches, so waiting for one to finish is the right back-pressure.
        with self._alloc_cv:
            while True:
                off = self._alloc.allocate(desc.nbytes + TAG_BYTES)
                if off is not None:
                    return off
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PoolFull(
                        f"receiver {self.name!r}: no free region for transfer {desc.transfer_id} "
                        f"({desc.nbytes} bytes; {self._alloc.bytes_used} of {self.pool_bytes} in use)"
                    )
                self._alloc_cv.wait(left)

    def _ensure_peer_locked(self, desc: EmbeddingDescriptor) -> None:
        md = desc.metadata_bytes()
        known = self._peers.get(desc.agent)
        if known == md:
            return
        if known is not None:
            # Same name, new metadata: the sender restarted; NIXL refuses to load a name twice.
            with contextlib.suppress(Exception):
                self._agent.remove_remote_agent(desc.agent)
            del self._peers[desc.agent]
            self._counts["peers_replaced"] += 1
        try:
            loaded = self._agent.add_remote_agent(md)
        except Exception as e:
            # Loading metadata opens the UCX endpoint: a sender that is gone fails here (e.g. its shared
            # memory segment no longer exists).
            raise PeerDisconnected(
                f"transfer {desc.transfer_id}: cannot connect to sender {desc.agent!r} (process gone, unreachable "
                f"or bad metadata): {type(e).__name__}: {e}"
            ) from e
        loaded = loaded.decode() if isinstance(loaded, bytes) else str(loaded)  # NIXL returns bytes here
        if loaded != desc.agent:
            with contextlib.suppress(Exception):
                self._agent.remove_remote_agent(loaded)
            raise ValueError(
                f"transfer {desc.transfer_id}: descriptor names agent {desc.agent!r} but its metadata is for {loaded!r}"
            )
        self._peers[desc.agent] = md
        self._counts["peers_added"] += 1

    def _forget_peer_locked(self, agent: str) -> None:
        if self._peers.pop(agent, None) is not None:
            with contextlib.suppress(Exception):
                self._agent.remove_remote_agent(agent)

    def _read(self, desc: EmbeddingDescriptor, offset: int, deadline: float) -> None:
        """READ ``desc`` into our region at ``offset``, waiting at most until ``deadline``."""
        what = f"transfer {desc.transfer_id} ({desc.nbytes} bytes from {desc.agent!r})"
        handle = None
        try:
            with self._nixl_lock:
                self._ensure_peer_locked(desc)
                size = desc.nbytes + TAG_BYTES
                local = self._agent.get_xfer_descs([(self._base + offset, size, 0)], "DRAM")
                remote = self._agent.get_xfer_descs([(desc.addr, size, 0)], "DRAM")
                handle = self._agent.initialize_xfer("READ", local, remote, desc.agent)
                state = self._agent.transfer(handle)
            spins = 0
            while state == "PROC":
                if time.monotonic() >= deadline:
                    h, handle = handle, None
                    self._abandon(h, desc, what)
                # Spin briefly (CMA copies happen inside these progress calls), then back off.
                spins += 1
                if spins > 200:
                    time.sleep(0.00005)
                with self._nixl_lock:
                    state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise TransferError(f"{what} failed (NIXL state {state})")
        except (ValueError, TransferError, TimeoutError):
            raise
        except Exception as e:
            if _is_disconnect(e):
                with self._nixl_lock:
                    self._forget_peer_locked(desc.agent)
                raise PeerDisconnected(f"{what}: the sender is disconnected (process gone?): {e}") from e
            raise TransferError(f"{what} failed: {type(e).__name__}: {e}") from e
        finally:
            if handle is not None:
                with self._nixl_lock, contextlib.suppress(Exception):
                    handle.release()

    def _abandon(self, handle: Any, desc: EmbeddingDescriptor, what: str) -> None:
        """Cancel a timed-out READ and raise TimeoutError (``_UncancelledTimeout`` if it could not be cancelled)."""
        with self._alloc_cv:
            self._counts["timeouts"] += 1
        msg = f"{what} did not complete in time; the sender may be stalled"
        try:
            with self._nixl_lock:
                handle.release()
        except Exception as e:
            with self._alloc_cv:
                self._counts["quarantined_bytes"] += desc.nbytes
            log.error(
                "receiver %s: could not cancel timed-out transfer %s (%s); its region stays reserved",
                self.name,
                desc.transfer_id,
                e,
            )
            raise _UncancelledTimeout(msg) from None
        raise TimeoutError(msg)

    def discard(self, desc: EmbeddingDescriptor) -> None:
        """Tell the sender we will not READ ``desc`` (the request failed before its fetch): the sender frees the
        region now instead of at its ack timeout. Best effort, like an ack."""
        if self._closed:
            return
        try:
            self.check(desc)
            with self._nixl_lock:
                self._ensure_peer_locked(desc)
        except Exception as e:  # noqa: BLE001 - nothing to free on an unreachable or malformed sender
            log.warning("receiver %s: cannot discard transfer %s: %s", self.name, desc.transfer_id, e)
            return
        self._ack(desc)

    def _ack(self, desc: EmbeddingDescriptor) -> None:
        try:
            with self._nixl_lock:
                self._agent.send_notif(desc.agent, ACK_PREFIX + desc.transfer_id.encode("ascii"))
                # The notification can stay queued in UCX until this agent is progressed again (seen: > 10 s in
                # one process; the sender's region stays taken meanwhile). A prefill that goes idle after its last
                # fetch would only release it at the ack timeout. get_new_notifs() progresses the worker; this
                # agent is sent nothing, so nothing is lost.
                self._agent.get_new_notifs()
        except Exception as e:
            # We have the data; a sender that vanished has nothing left to free.
            log.warning("receiver %s: ack for transfer %s to %r failed: %s", self.name, desc.transfer_id, desc.agent, e)
