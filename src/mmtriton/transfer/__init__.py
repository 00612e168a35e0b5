"""Embedding transfer between processes over NIXL (UCX, DRAM), with pre-registered pools and explicit acks.

The encoder owns an :class:`EmbeddingSender`: one contiguous CPU buffer, registered with NIXL once. ``put()``
copies an embedding into a free region of it and returns an :class:`EmbeddingDescriptor` (JSON-able) that
travels to the LLM prefill process with the request. There an :class:`EmbeddingReceiver` (its own registered
buffer) READs the region, copies it out into a fresh tensor and sends the sender an acknowledgement
notification; only then (or after ``ack_timeout_s``) does the sender reuse the region, because deregistering
or overwriting memory does not revoke a peer's access to it. Each region ends with a 16-byte tag derived
from the transfer id, wiped when the region is released, so a late, repeated or redirected READ is detected
instead of returning another request's bytes.

Modules: :mod:`.descriptor` (the JSON-able descriptor, dtypes), :mod:`.pool` (region allocator, region tags,
byte copies), :mod:`.agent` (NIXL agent creation, registration, and the measured NIXL configuration),
:mod:`.sender`, :mod:`.receiver`, :mod:`.errors`.

NIXL agents are created with NIXL_THREAD_SYNC_NONE, i.e. not thread-safe: the sender's agent is touched only
by its poll thread, and the receiver serialises every agent call with a lock (held per call, not per
transfer). Over shared memory (CMA, the default here) the whole READ happens inside ``transfer()``, so
concurrent fetches run one after another and ``timeout_s`` cannot interrupt a READ in progress; a dead sender
still ends it at once (``PeerDisconnected``, tests/test_transfer_peer_death.py). Only a transport whose
``transfer()`` returns ``PROC`` overlaps fetches. Knows nothing of Triton or vLLM.
"""

from mmtriton.transfer.agent import ACK_PREFIX
from mmtriton.transfer.descriptor import DESCRIPTOR_VERSION, DTYPE_NAMES, DTYPES, EmbeddingDescriptor
from mmtriton.transfer.errors import PeerDisconnected, PoolFull, TransferError, TransferExpired
from mmtriton.transfer.pool import DEFAULT_ALIGNMENT, TAG_BYTES, Occupancy, RegionAllocator
from mmtriton.transfer.receiver import EmbeddingReceiver, ReceiverStats
from mmtriton.transfer.sender import EmbeddingSender, SenderStats

__all__ = [
    "ACK_PREFIX",
    "DEFAULT_ALIGNMENT",
    "DESCRIPTOR_VERSION",
    "DTYPES",
    "DTYPE_NAMES",
    "TAG_BYTES",
    "EmbeddingDescriptor",
    "EmbeddingReceiver",
    "EmbeddingSender",
    "Occupancy",
    "PeerDisconnected",
    "PoolFull",
    "ReceiverStats",
    "RegionAllocator",
    "SenderStats",
    "TransferError",
    "TransferExpired",
]
