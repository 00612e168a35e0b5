"""Object lifetimes the Triton stub gets wrong, handled from Python."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any


class ReleaseLater:
    """Keeps objects alive for ``delay_s`` and then drops them from a Python thread (one holding the GIL).

    Why: in Triton 2.51 a decoupled BLS ``ResponseIterator`` is also held in a map in the stub that a C++ cleanup
    thread clears shortly after the last response. If Python lets go first, that thread destroys the responses,
    and with them the numpy arrays every CPU output tensor carries, without the GIL: pymalloc corruption and a
    stub segfault under load. Letting go later makes Python's reference the last one.
    """

    def __init__(self, delay_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.delay_s = delay_s
        self.clock = clock
        self._held: deque[tuple[float, Any]] = deque()
        self._lock = threading.Lock()

    def hold(self, obj: Any) -> None:
        now = self.clock()
        expired = []
        with self._lock:
            self._held.append((now + self.delay_s, obj))
            while self._held and self._held[0][0] <= now:
                expired.append(self._held.popleft())
        del expired  # dropped here, outside the lock

    def __len__(self) -> int:
        return len(self._held)
