"""The errors of embedding transfer: a failed READ, a vanished sender, a reclaimed region, a full pool."""

from __future__ import annotations


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
