"""Per-stage timing as plain Python: models record, the Triton glue exports (mmtriton.triton_io.GaugeExporter).

Each stage keeps a count and a total in seconds (Prometheus-style ``_count`` / ``_sum``), so a scraper gets mean
latency per stage as rate(sum) / rate(count).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimes:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: dict[str, float] = {}
        self._sum: dict[str, float] = {}

    def add(self, stage: str, seconds: float, count: float = 1.0) -> None:
        with self._lock:
            self._count[stage] = self._count.get(stage, 0.0) + count
            self._sum[stage] = self._sum.get(stage, 0.0) + seconds

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def sums(self) -> dict[str, float]:
        with self._lock:
            return dict(self._sum)

    def counts(self) -> dict[str, float]:
        with self._lock:
            return dict(self._count)
