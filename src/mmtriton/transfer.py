"""Embedding transfer between processes over NIXL (UCX, DRAM), with pre-registered pools and explicit acks.

The encoder owns an :class:`EmbeddingSender`: one contiguous CPU buffer, registered with NIXL once. ``put()``
copies an embedding into a free region of it and returns an :class:`EmbeddingDescriptor` (JSON-able) that
travels to the LLM prefill process with the request. There an :class:`EmbeddingReceiver` (its own registered
buffer) READs the region, copies it out into a fresh tensor and sends the sender an acknowledgement
notification; only then (or after ``ack_timeout_s``) does the sender reuse the region, because deregistering
or overwriting memory does not revoke a peer's access to it. Each region ends with a 16-byte tag derived
from the transfer id, wiped when the region is released, so a late, repeated or redirected READ is detected
instead of returning another request's bytes.

NIXL configuration (measured on a 2-core CPU host, two processes, UCX over CMA/shared memory):

* progress thread off: with it on, every idle agent burns ~50% of a core and 16-64 MiB READs run at about
  a third of the bandwidth;
* ``ucx_error_handling_mode=none``: in ``peer`` mode UCX drops the shared-memory transports for active
  messages, so acks go over TCP loopback and a 4 KiB fetch() takes ~1 ms instead of ~50 us. A dead sender
  is still reported at once (nixlRemoteDisconnectError over CMA and over TCP); a hung one hits our timeout;
* no listener thread: the sender's agent metadata (~0.6 KB base64) rides inside each descriptor, so no
  port is opened (NIXL's listener binds 0.0.0.0), there is no extra round trip, and a restarted sender is
  recognised by its new metadata;
* the passive side (the sender) must still make UCX progress to receive acks (and, over TCP, to serve the
  READs at all), so each sender runs one small thread that calls ``get_new_notifs()`` every
  ``poll_interval_s`` while regions are out and every ``idle_poll_interval_s`` when none are;
* UCX_NET_DEVICES defaults to ``lo`` for our agents only (set while the agent is created, then restored),
  unless the user set it or ``net_devices`` says otherwise; shared-memory transports are unaffected.

NIXL agents are created with NIXL_THREAD_SYNC_NONE, i.e. not thread-safe: the sender's agent is touched only
by its poll thread, and the receiver serialises every agent call with a lock (held per call, not per
transfer, so concurrent fetches overlap). Knows nothing of Triton or vLLM.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import contextlib
import ctypes
import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

log = logging.getLogger(__name__)

# dtypes that may travel; names are torch's without the "torch." prefix.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

ACK_PREFIX = b"mmt-ack:"
# Each region ends with a tag derived from its transfer id. The sender wipes it when it reclaims an expired
# region, so a reader that comes too late gets an error instead of some other request's embedding.
TAG_BYTES = 16
DEFAULT_ALIGNMENT = 256
DESCRIPTOR_VERSION = 1
_LOOPBACK_DEVICES = "lo"


class TransferError(RuntimeError):
    """A NIXL transfer failed (peer gone, bad remote region, backend error)."""


class PeerDisconnected(TransferError):
    """The sender's agent is unreachable: its process died or its network went away."""


class TransferExpired(TransferError):
    """The sender reclaimed the region (no ack within its ack_timeout_s) before this READ: data not trusted."""


class PoolFull(RuntimeError):
    """No free region large enough in a registered pool, even after reclaiming expired regions."""


class _UncancelledTimeout(TimeoutError):
    """A timed-out READ that NIXL could not cancel: its destination region must not be reused."""


# ---------------------------------------------------------------------------------------------------------------
# Descriptor


def _fail(msg: str) -> None:
    raise ValueError(f"invalid embedding descriptor: {msg}")


def _is_int(x: Any) -> bool:
    # bool is an int subclass; a JSON `true` is not a size.
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class EmbeddingDescriptor:
    """Everything a receiver needs to READ one embedding from a sender's pool.

    ``agent_metadata`` is the sender's full NIXL agent metadata, base64: small (~600 chars), and carrying it
    in-band avoids NIXL's listener (a socket on 0.0.0.0) and a metadata round trip; the receiver loads it only
    the first time it sees that sender, or again when it changes (the sender restarted).
    """

    transfer_id: str
    agent: str
    agent_metadata: str
    addr: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = DESCRIPTOR_VERSION

    def validate(self) -> None:
        """Self-consistency checks; raises ValueError naming the bad field."""
        if not isinstance(self.transfer_id, str) or not self.transfer_id:
            _fail("transfer_id must be a non-empty string")
        if not isinstance(self.agent, str) or not self.agent:
            _fail("agent must be a non-empty string")
        if not isinstance(self.agent_metadata, str) or not self.agent_metadata:
            _fail("agent_metadata must be a non-empty base64 string")
        if not _is_int(self.addr) or self.addr < 0:
            _fail(f"addr must be a non-negative integer, got {self.addr!r}")
        if not _is_int(self.nbytes) or self.nbytes < 0:
            _fail(f"nbytes must be a non-negative integer, got {self.nbytes!r}")
        if not isinstance(self.shape, tuple) or not all(_is_int(d) and d >= 0 for d in self.shape):
            _fail(f"shape must be a list of non-negative integers, got {self.shape!r}")
        if self.dtype not in DTYPES:
            _fail(f"unknown dtype {self.dtype!r} (known: {', '.join(DTYPES)})")
        if not isinstance(self.extra, dict):
            _fail(f"extra must be an object, got {type(self.extra).__name__}")
        if self.version != DESCRIPTOR_VERSION:
            _fail(f"unsupported version {self.version!r} (this build reads {DESCRIPTOR_VERSION})")
        expected = math.prod(self.shape) * DTYPES[self.dtype].itemsize
        if self.nbytes != expected:
            _fail(f"nbytes {self.nbytes} != prod(shape {list(self.shape)}) * itemsize of {self.dtype} = {expected}")

    def metadata_bytes(self) -> bytes:
        try:
            return base64.b64decode(self.agent_metadata, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"invalid embedding descriptor: agent_metadata is not valid base64 ({e})") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EmbeddingDescriptor:
        if not isinstance(d, Mapping):
            _fail(f"expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        required = {"transfer_id", "agent", "agent_metadata", "addr", "nbytes", "shape", "dtype"}
        missing = sorted(required - d.keys())
        if missing:
            _fail(f"missing field(s) {', '.join(missing)}")
        unknown = sorted(set(d) - names)
        if unknown:
            _fail(f"unknown field(s) {', '.join(unknown)}")
        shape = d["shape"]
        if not isinstance(shape, list | tuple):
            _fail(f"shape must be a list of non-negative integers, got {shape!r}")
        desc = cls(**{**d, "shape": tuple(shape), "extra": d.get("extra", {})})
        desc.validate()
        desc.metadata_bytes()
        return desc

    @classmethod
    def from_json(cls, text: str | bytes) -> EmbeddingDescriptor:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise ValueError(f"invalid embedding descriptor: not JSON ({e})") from None
        return cls.from_dict(d)


# ---------------------------------------------------------------------------------------------------------------
# Pool allocator


class RegionAllocator:
    """First-fit allocator over [0, capacity) with aligned region sizes; not thread-safe (callers lock).

    Free space is a sorted list of (offset, size) blocks, coalesced on free; with tens of regions in flight a
    linear scan is cheaper than anything cleverer.
    """

    def __init__(self, capacity: int, alignment: int = DEFAULT_ALIGNMENT) -> None:
        if capacity <= 0:
            raise ValueError(f"pool capacity must be positive, got {capacity}")
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a positive power of two, got {alignment}")
        self.capacity = capacity
        self.alignment = alignment
        self._free: list[tuple[int, int]] = [(0, capacity)]
        self._used: dict[int, int] = {}  # offset -> reserved size

    def _round(self, nbytes: int) -> int:
        return max(self.alignment, (nbytes + self.alignment - 1) & ~(self.alignment - 1))

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a region of at least ``nbytes``, or None when no free block is large enough."""
        size = self._round(nbytes)
        for i, (off, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (off + size, free - size)
                self._used[off] = size
                return off
        return None

    def free(self, offset: int) -> None:
        size = self._used.pop(offset)
        i = bisect.bisect_left(self._free, (offset, 0))
        # Coalesce with the following block, then with the preceding one.
        if i < len(self._free) and self._free[i][0] == offset + size:
            size += self._free[i][1]
            del self._free[i]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
            i -= 1
            del self._free[i]
        self._free.insert(i, (offset, size))

    @property
    def bytes_used(self) -> int:
        return sum(self._used.values())

    @property
    def regions_used(self) -> int:
        return len(self._used)

    @property
    def largest_free(self) -> int:
        return max((s for _, s in self._free), default=0)


@dataclass(frozen=True)
class Occupancy:
    bytes_in_use: int
    regions_in_use: int
    capacity: int


@dataclass(frozen=True)
class SenderStats:
    puts: int = 0
    acks: int = 0
    expired: int = 0
    late_acks: int = 0  # acks for regions already reclaimed by expiry (ack_timeout_s too short?)
    pool_full: int = 0
    poll_errors: int = 0


@dataclass(frozen=True)
class ReceiverStats:
    fetches: int = 0
    bytes_fetched: int = 0
    peers_added: int = 0
    peers_replaced: int = 0
    failures: int = 0
    timeouts: int = 0
    quarantined_bytes: int = 0  # local regions never reused: a timed-out READ could not be cancelled


# ---------------------------------------------------------------------------------------------------------------
# NIXL agent plumbing

_env_lock = threading.Lock()


@contextlib.contextmanager
def _ucx_net_devices(net_devices: str | None) -> Iterator[None]:
    """Set UCX_NET_DEVICES while one agent's UCX context is created, then restore it.

    UCX reads the variable when the backend (UCX context/worker) is created, so scoping it keeps other UCX
    users in the process (e.g. vLLM's NixlConnector) as the user configured them. Order: explicit argument,
    then the user's own UCX_NET_DEVICES, then loopback.
    """
    with _env_lock:
        old = os.environ.get("UCX_NET_DEVICES")
        value = net_devices if net_devices is not None else (old if old is not None else _LOOPBACK_DEVICES)
        os.environ["UCX_NET_DEVICES"] = value
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("UCX_NET_DEVICES", None)
            else:
                os.environ["UCX_NET_DEVICES"] = old


def _create_agent(name: str, net_devices: str | None, error_handling: str) -> Any:
    from nixl._api import nixl_agent, nixl_agent_config

    # Progress and listener threads off (see module docstring); the UCX backend is created explicitly so
    # its error-handling mode can be chosen.
    conf = nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False, backends=[])
    with _ucx_net_devices(net_devices):
        agent = nixl_agent(name, conf)
        agent.create_backend("UCX", {"ucx_error_handling_mode": error_handling})
    return agent


def _register(agent: Any, buf: torch.Tensor) -> Any:
    # (ptr, nbytes, dev, meta) tuples: registering numpy arrays fails, and NIXL logs rather than raises.
    descs = agent.register_memory([(buf.data_ptr(), buf.numel(), 0, "")], "DRAM")
    if descs is None:
        raise TransferError(f"NIXL agent {agent.name!r}: registering {buf.numel()} bytes of DRAM failed")
    return descs


def _is_disconnect(e: BaseException) -> bool:
    try:
        from nixl._bindings import nixlRemoteDisconnectError
    except ImportError:  # pragma: no cover - the binding module layout changed
        return "DISCONNECT" in str(e)
    return isinstance(e, nixlRemoteDisconnectError)


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor as a 1-D uint8 view (0-dim and bool included)."""
    return t.reshape(-1).view(torch.uint8)


def _tag(transfer_id: str) -> bytes:
    return hashlib.blake2b(transfer_id.encode(), digest_size=TAG_BYTES).digest()


def _copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy between equal-sized 1-D uint8 tensors.

    CPU to CPU goes through a plain single-threaded memmove (GIL released): torch's copy_ fans out to its
    OpenMP threads, and when the other cores are busy (a vLLM engine next door) it waits a scheduler slice
    for them: measured ~8 ms for a 1 MiB copy on a loaded 2-core host, against ~60 us for memmove.
    """
    if dst.numel() != src.numel() or dst.dtype != torch.uint8 or src.dtype != torch.uint8:  # never memmove blind
        raise ValueError(f"byte copy mismatch: {dst.numel()} vs {src.numel()} bytes, {dst.dtype} / {src.dtype}")
    if dst.device.type == "cpu" and src.device.type == "cpu":
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.numel())
    else:
        dst.copy_(src)


# ---------------------------------------------------------------------------------------------------------------
# Sender


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


# ---------------------------------------------------------------------------------------------------------------
# Receiver


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

    def _ack(self, desc: EmbeddingDescriptor) -> None:
        try:
            with self._nixl_lock:
                self._agent.send_notif(desc.agent, ACK_PREFIX + desc.transfer_id.encode("ascii"))
        except Exception as e:
            # We have the data; a sender that vanished has nothing left to free.
            log.warning("receiver %s: ack for transfer %s to %r failed: %s", self.name, desc.transfer_id, desc.agent, e)
