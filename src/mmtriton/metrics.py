"""Per-stage timing as plain Python: models record, the Triton glue exports (mmtriton.triton_io.GaugeExporter).

Each stage keeps a count and a total in seconds (Prometheus-style ``_count`` / ``_sum``), so a scraper gets mean
latency per stage as rate(sum) / rate(count); and a histogram of the same observations (``Histogram``), so it
gets percentiles too.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Bucket bounds (seconds) of the stage histograms: from a cached media lookup (~1 ms) to a cold engine step.
STAGE_BUCKETS_S: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                                      10.0, 30.0, 60.0)


@dataclass(frozen=True)
class HistogramSnapshot:
    """A histogram's state: per bucket (not cumulative; the last one is +Inf) the observations and their sum."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]
    sums: tuple[float, ...]

    @property
    def count(self) -> float:
        return sum(self.counts)

    @property
    def sum(self) -> float:
        return sum(self.sums)

    def cumulative(self) -> list[tuple[float, float]]:
        """(le, observations <= le) pairs as Prometheus' ``_bucket`` series has them, +Inf last."""
        out, running = [], 0.0
        for le, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append((le, running))
        return out


class Histogram:
    """Prometheus-style histogram, plain Python and not locked (its owner locks).

    Each bucket keeps the sum of its own observations as well as their count: a reader that can only *observe*
    (Triton's histogram metrics) can then replay any interval exactly, as ``count`` observations of the
    bucket's mean (which lies inside the bucket), and get the same buckets, count and sum (``replay``)."""

    def __init__(self, bounds: Iterable[float]):
        self.bounds = tuple(float(b) for b in bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"histogram bounds must increase strictly: {self.bounds}")
        self._counts = [0.0] * (len(self.bounds) + 1)
        self._sums = [0.0] * (len(self.bounds) + 1)

    def observe(self, value: float, count: float = 1.0) -> None:
        """``count`` observations of ``value`` (a stage timed as one total over ``count`` tokens: its mean)."""
        i = bisect.bisect_left(self.bounds, value)  # bucket le=bounds[i] holds values <= bounds[i]
        self._counts[i] += count
        self._sums[i] += value * count

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self._counts), tuple(self._sums))


def replay(before: HistogramSnapshot | None, after: HistogramSnapshot) -> list[tuple[float, int]]:
    """What happened between two snapshots as (value, times) observations: per bucket its new observations'
    mean, kept inside the bucket (float rounding must not move it across a bound)."""
    out: list[tuple[float, int]] = []
    for i, (n_after, s_after) in enumerate(zip(after.counts, after.sums, strict=True)):
        n = n_after - (before.counts[i] if before is not None else 0.0)
        s = s_after - (before.sums[i] if before is not None else 0.0)
        times = int(round(n))
        if times <= 0:
            continue
        mean = s / n
        if i < len(after.bounds):
            mean = min(mean, after.bounds[i])
        if i > 0:
            mean = max(mean, math.nextafter(after.bounds[i - 1], math.inf))
        out.append((mean, times))
    return out


class StageTimes:
    def __init__(self, buckets: Iterable[float] = STAGE_BUCKETS_S) -> None:
        self._lock = threading.Lock()
        self._count: dict[str, float] = {}
        self._sum: dict[str, float] = {}
        self._buckets = tuple(buckets)
        self._histograms: dict[str, Histogram] = {}

    def add(self, stage: str, seconds: float, count: float = 1.0) -> None:
        """``seconds`` spent on ``count`` executions of ``stage`` (e.g. one request's decode over its tokens):
        the histogram gets ``count`` observations of their mean."""
        with self._lock:
            self._count[stage] = self._count.get(stage, 0.0) + count
            self._sum[stage] = self._sum.get(stage, 0.0) + seconds
            if count > 0:
                histogram = self._histograms.get(stage)
                if histogram is None:
                    histogram = self._histograms[stage] = Histogram(self._buckets)
                histogram.observe(seconds / count, count)

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

    def histograms(self) -> dict[str, HistogramSnapshot]:
        with self._lock:
            return {stage: h.snapshot() for stage, h in self._histograms.items()}
