"""A least-recently-used cache bounded by the total size of its values in bytes (not by item count)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """``get`` / ``put`` in O(1); evicts the least recently *used* entries until the total fits ``max_bytes``.

    ``size_of(value)`` gives an entry's cost in bytes, unless ``put`` is told it (``size=``). A value bigger
    than the whole budget is not cached (it would evict everything and then itself). Safe to share between
    threads: every operation holds one lock.
    """

    def __init__(self, max_bytes: int, size_of: Callable[[V], int] | None = None):
        self.max_bytes = max(0, int(max_bytes))
        self._size_of = size_of
        # key → (value, size); order = recency, oldest first.
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)  # a hit makes it the most recently used
            self.hits += 1
            return entry[0]

    def put(self, key: K, value: V, size: int | None = None) -> bool:
        """Insert or replace; returns False (and drops any old entry for ``key``) when ``value`` is too big.

        ``size``: the value's cost when the caller knows it (values of several kinds share one cache)."""
        if size is None:
            if self._size_of is None:
                raise TypeError("ByteLRU.put needs size= when the cache has no size_of")
            size = self._size_of(value)
        size = int(size)
        with self._lock:
            self._remove(key)
            if size > self.max_bytes:
                return False
            self._entries[key] = (value, size)
            self._bytes += size
            self._evict_to_budget()
            return True

    def pop(self, key: K) -> V | None:
        with self._lock:
            entry = self._remove(key)
            return None if entry is None else entry[0]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __contains__(self, key: object) -> bool:
        # A membership test is not a use: recency and counters are left alone.
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "bytes": self._bytes,
                "items": len(self._entries),
            }

    # Callers hold the lock.
    def _remove(self, key: K) -> tuple[V, int] | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]
        return entry

    def _evict_to_budget(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            _, (_, size) = self._entries.popitem(last=False)
            self._bytes -= size
            self.evictions += 1
