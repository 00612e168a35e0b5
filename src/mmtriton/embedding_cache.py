"""The encoders' embedding cache: a repeated media item skips the tower.

Keyed by what the tower sees, not by where the item came from: the sha256 of the *decoded* item (an image's mode,
size and pixels; a video's sampled frames and their timestamps; an audio clip's samples at the tower's rate), ×
the media kind, × the encoder (its model, checkpoint and dtype). So one picture sent as a data: URI, a file and
an http URL is one entry, and a video's sampling options are in the key through the frames they sampled. Values
are CPU copies of the tower's output (:class:`~mmtriton.encoder_service.EncodedMedia`), in a byte-bounded LRU
(:class:`~mmtriton.media.cache.ByteLRU`, the decoded-media cache's). The cache never holds a pool region: every
hand-over, hit or not, is copied into a fresh region of the encoder's NIXL pool, which prefill's ack (or the ack
timeout) frees as before.

One batch of the tower goes through :meth:`EmbeddingCache.plan`: its items are looked up, identical items are
encoded once, and :meth:`EncodePlan.complete` takes the tower's outputs for the rest, stores them and returns
one EncodedMedia per item in the batch's order.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mmtriton.media.cache import ByteLRU

if TYPE_CHECKING:
    from mmtriton.encoder_service import EncodedMedia

# Per-entry bookkeeping on top of the tensor's bytes (key, tuple, tensor header): small but never zero.
ENTRY_OVERHEAD_BYTES = 256


def content_digest(loaded: Any) -> str | None:
    """sha256 of a loaded item as the tower will see it; None for a value of a type not known here (not cached)."""
    from PIL import Image

    from mmtriton.media.video import SampledVideo

    h = hashlib.sha256()
    if isinstance(loaded, Image.Image):
        h.update(f"image:{loaded.mode}:{loaded.size}".encode())
        h.update(loaded.tobytes())
    elif isinstance(loaded, SampledVideo):
        # The frames the tower encodes, and when they were taken (a processor may space temporal positions by it).
        frames = np.ascontiguousarray(loaded.frames)
        h.update(f"video:{frames.dtype}:{frames.shape}:{loaded.timestamps_s}:{loaded.sampled_fps!r}".encode())
        h.update(memoryview(frames).cast("B"))
    elif isinstance(loaded, np.ndarray):
        samples = np.ascontiguousarray(loaded)
        h.update(f"array:{samples.dtype}:{samples.shape}".encode())
        h.update(memoryview(samples).cast("B"))
    else:
        return None
    return h.hexdigest()


class DigestMemo:
    """Content digests of objects seen recently, by identity. The decoded-media cache hands the same object to
    every request that repeats an item, so its pixels are hashed once instead of per request (~4–5 ms for a
    1024² image here). Weak references only: an entry goes with its object; at most ``max_entries``."""

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self._by_id: dict[int, tuple[weakref.ref, str]] = {}
        self._lock = threading.Lock()

    def digest(self, loaded: Any) -> str | None:
        key = id(loaded)
        with self._lock:
            entry = self._by_id.get(key)
        if entry is not None and entry[0]() is loaded:
            return entry[1]
        digest = content_digest(loaded)
        if digest is None:
            return None
        try:
            ref = weakref.ref(loaded, lambda dead, key=key: self._forget(key, dead))
        except TypeError:  # not weak-referenceable: hashed each time
            return digest
        with self._lock:
            self._by_id[key] = (ref, digest)
            while len(self._by_id) > self.max_entries:
                del self._by_id[next(iter(self._by_id))]  # the oldest
        return digest

    def _forget(self, key: int, dead: weakref.ref) -> None:
        with self._lock:
            if (entry := self._by_id.get(key)) is not None and entry[0] is dead:
                del self._by_id[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)


def encoded_nbytes(encoded: EncodedMedia) -> int:
    return encoded.embeddings.numel() * encoded.embeddings.element_size() + ENTRY_OVERHEAD_BYTES


@dataclass
class EncodePlan:
    """One batch's items: those the cache (or an identical item earlier in the batch) answers, and the
    ``to_encode`` the tower must run; :meth:`complete` gives every item its EncodedMedia."""

    cache: EmbeddingCache | None
    size: int
    to_encode: list[Any] = field(default_factory=list)
    # Per batch item: a cached EncodedMedia, or the index of its output among the tower's (to_encode order).
    sources: list[EncodedMedia | int] = field(default_factory=list)
    # Per to_encode index: the key its output is stored under (None: not cacheable).
    store_keys: list[str | None] = field(default_factory=list)

    def complete(self, fresh: Sequence[EncodedMedia]) -> list[EncodedMedia]:
        """The tower's outputs for ``to_encode`` (in order) → one EncodedMedia per batch item; stores them."""
        if len(fresh) != len(self.to_encode):
            raise ValueError(f"the tower returned {len(fresh)} outputs for {len(self.to_encode)} items")
        if self.cache is not None:
            for key, encoded in zip(self.store_keys, fresh, strict=True):
                if key is not None:
                    self.cache.put(key, encoded)
        return [source if not isinstance(source, int) else fresh[source] for source in self.sources]


class EmbeddingCache:
    """A byte-bounded LRU of encoded media for one encoder; ``max_bytes`` 0 disables it (every item is encoded,
    nothing is hashed). Thread-safe: the LRU and the counters each hold a lock."""

    def __init__(self, max_bytes: int, scope: str):
        # scope: what else changes the embeddings (encoder model, checkpoint, dtype); part of every key.
        self.scope = scope
        self.enabled = max_bytes > 0
        self.lru: ByteLRU[str, EncodedMedia] = ByteLRU(max_bytes, size_of=encoded_nbytes)
        self._lock = threading.Lock()
        # Items answered without the tower (cached, or identical to another item of the same batch), and items
        # the tower encoded because they were not.
        self.hits = 0
        self.misses = 0
        self.digests = DigestMemo()

    def key(self, kind: str, loaded: Any) -> str | None:
        digest = self.digests.digest(loaded)
        return None if digest is None else f"{self.scope}|{kind}|{digest}"

    def plan(self, kinds: Sequence[str], loaded: Sequence[Any]) -> EncodePlan:
        """Look up one batch (``kinds[i]`` the media kind of ``loaded[i]``); hashing runs here, so call it off the
        event loop."""
        plan = EncodePlan(self if self.enabled else None, len(loaded))
        first_of_key: dict[str, int] = {}  # key → its to_encode index, for identical items in this batch
        hits = misses = 0
        for kind, value in zip(kinds, loaded, strict=True):
            key = self.key(kind, value) if self.enabled else None
            if key is not None and key in first_of_key:
                plan.sources.append(first_of_key[key])
                hits += 1
                continue
            if key is not None and (cached := self.lru.get(key)) is not None:
                plan.sources.append(cached)
                hits += 1
                continue
            if key is not None:
                first_of_key[key] = len(plan.to_encode)
                misses += 1
            plan.sources.append(len(plan.to_encode))
            plan.to_encode.append(value)
            plan.store_keys.append(key)
        with self._lock:
            self.hits += hits
            self.misses += misses
        return plan

    def put(self, key: str, encoded: EncodedMedia) -> None:
        from mmtriton.encoder_service import EncodedMedia

        # A copy on the CPU: the tower's output may be a view into the whole batch's tensor (keeping all of it
        # alive) or live on an accelerator; the copy is also a plain tensor, not an inference-mode one.
        embeddings = encoded.embeddings.detach().to("cpu", copy=True)
        self.lru.put(key, EncodedMedia(embeddings, encoded.grid_thw))

    def stats(self) -> dict[str, float]:
        """hits, misses, bytes, entries, evictions (the ``mmtriton_embedding_cache`` gauge's items)."""
        lru = self.lru.stats()
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "bytes": lru["bytes"], "entries": lru["items"],
                    "evictions": lru["evictions"]}
