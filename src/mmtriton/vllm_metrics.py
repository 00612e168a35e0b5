"""vLLM's own metrics (``vllm:*``) for a served engine: a vLLM stat logger that records into plain Python.

``AsyncLLM`` hands every engine step's ``SchedulerStats`` / ``IterationStats`` to its stat loggers, on its output
handler task (the engine loop). ``TritonStatLogger`` folds them into a ``VllmStats`` store under one lock, with no
I/O; the Triton glue (mmtriton.triton_io.VllmMetricsExport, run by GaugeExporter's thread) publishes the store as
Triton metric families on :8002/metrics, as triton-inference-server/vllm_backend does (its ``src/utils/
metrics.py``), but off the engine loop: every Triton metric call is a round trip to the server process.

The store belongs to the VllmEngine (``stats_of``), not to an AsyncLLM: a restarted engine's new logger records
into the same store, so counters and histograms carry on across restarts (Prometheus counters must not go back).

Names are vLLM 0.32's (``vllm/v1/metrics/loggers.py`` PrometheusStatLogger), counters with the ``_total`` suffix
prometheus_client adds on vLLM's own /metrics (Triton does not add it). This module imports vLLM only when a
logger is made: importing vLLM takes ~10 s, and the encoders' and the tests' Triton glue import this module.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mmtriton.metrics import Histogram, HistogramSnapshot

log = logging.getLogger(__name__)

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"


@dataclass(frozen=True)
class VllmMetric:
    name: str
    kind: str  # COUNTER | GAUGE | HISTOGRAM
    help: str
    bucket_family: str = ""  # histograms: vllm.v1.metrics.buckets family key (the engine's own bounds)


# Every family exported, in exposition order. Help texts are vLLM's.
VLLM_METRICS: tuple[VllmMetric, ...] = (
    VllmMetric("vllm:num_requests_running", GAUGE, "Number of requests in model execution batches."),
    VllmMetric("vllm:num_requests_waiting", GAUGE, "Number of requests waiting to be processed."),
    VllmMetric("vllm:kv_cache_usage_perc", GAUGE, "KV-cache usage. 1 means 100 percent usage."),
    VllmMetric("vllm:prompt_tokens_total", COUNTER, "Number of prefill tokens processed."),
    VllmMetric("vllm:prompt_tokens_cached_total", COUNTER, "Number of cached prompt tokens (local + external)."),
    VllmMetric("vllm:generation_tokens_total", COUNTER, "Number of generation tokens processed."),
    VllmMetric("vllm:prefix_cache_queries_total", COUNTER,
               "Prefix cache queries, in terms of number of queried tokens."),
    VllmMetric("vllm:prefix_cache_hits_total", COUNTER, "Prefix cache hits, in terms of number of cached tokens."),
    VllmMetric("vllm:external_prefix_cache_queries_total", COUNTER,
               "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number "
               "of queried tokens."),
    VllmMetric("vllm:external_prefix_cache_hits_total", COUNTER,
               "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of "
               "cached tokens."),
    VllmMetric("vllm:mm_cache_queries_total", COUNTER,
               "Multi-modal cache queries, in terms of number of queried items."),
    VllmMetric("vllm:mm_cache_hits_total", COUNTER, "Multi-modal cache hits, in terms of number of cached items."),
    VllmMetric("vllm:num_preemptions_total", COUNTER, "Cumulative number of preemption from the engine."),
    VllmMetric("vllm:request_success_total", COUNTER,
               "Count of successfully processed requests (label finished_reason)."),
    VllmMetric("vllm:time_to_first_token_seconds", HISTOGRAM, "Histogram of time to first token in seconds.",
               "time_to_first_token"),
    VllmMetric("vllm:inter_token_latency_seconds", HISTOGRAM, "Histogram of inter-token latency in seconds.",
               "inter_token_latency"),
    VllmMetric("vllm:request_time_per_output_token_seconds", HISTOGRAM,
               "Histogram of time_per_output_token_seconds per request.", "inter_token_latency"),
    VllmMetric("vllm:e2e_request_latency_seconds", HISTOGRAM, "Histogram of e2e request latency in seconds.",
               "request_latency"),
    VllmMetric("vllm:request_queue_time_seconds", HISTOGRAM,
               "Histogram of time spent in WAITING phase for request.", "request_latency"),
    VllmMetric("vllm:request_inference_time_seconds", HISTOGRAM,
               "Histogram of time spent in RUNNING phase for request.", "request_latency"),
    VllmMetric("vllm:request_prefill_time_seconds", HISTOGRAM,
               "Histogram of time spent in PREFILL phase for request.", "request_latency"),
    VllmMetric("vllm:request_decode_time_seconds", HISTOGRAM,
               "Histogram of time spent in DECODE phase for request.", "request_latency"),
    VllmMetric("vllm:request_prompt_tokens", HISTOGRAM, "Number of prefill tokens processed.", "request_tokens"),
    VllmMetric("vllm:request_generation_tokens", HISTOGRAM, "Number of generation tokens processed.",
               "request_tokens"),
    VllmMetric("vllm:iteration_tokens_total", HISTOGRAM, "Histogram of number of tokens per engine_step.",
               "iteration_tokens"),
)
METRICS_BY_NAME: dict[str, VllmMetric] = {m.name: m for m in VLLM_METRICS}

Labels = tuple[tuple[str, str], ...]  # extra labels beyond model/version, e.g. (("finished_reason", "stop"),)


@dataclass(frozen=True)
class VllmSnapshot:
    counters: dict[tuple[str, Labels], float]
    gauges: dict[str, float]
    histograms: dict[str, HistogramSnapshot]
    record_errors: int  # stat-logger calls that raised (swallowed: see TritonStatLogger.record)
    loggers_attached: int  # one per AsyncLLM made (1 + engine restarts)


class VllmStats:
    """The engine's vLLM metrics, cumulative over its AsyncLLMs; written by loggers, read by exporters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, Labels], float] = {}
        self._gauges: dict[str, float] = {}
        self._histograms: dict[str, Histogram] = {}
        self.record_errors = 0
        self.loggers_attached = 0

    def attach(self, bounds: dict[str, list[float]]) -> None:
        """A new AsyncLLM's logger: its histograms' bounds (kept from the first engine: a histogram's buckets
        cannot change under a scraper), and gauges back to an idle engine's (the dead one's requests are gone)."""
        with self._lock:
            for name, histogram_bounds in bounds.items():
                self._histograms.setdefault(name, Histogram(histogram_bounds))
            for metric in VLLM_METRICS:
                if metric.kind == GAUGE:
                    self._gauges[metric.name] = 0.0
            self.loggers_attached += 1

    def apply(self, increments: Iterable[tuple[str, Labels, float]], gauges: Iterable[tuple[str, float]],
              observations: Iterable[tuple[str, float]]) -> None:
        """One engine step's changes, under one lock."""
        with self._lock:
            for name, labels, value in increments:
                if value:
                    self._counters[(name, labels)] = self._counters.get((name, labels), 0.0) + value
            for name, value in gauges:
                self._gauges[name] = float(value)
            for name, value in observations:
                histogram = self._histograms.get(name)
                if histogram is not None:
                    histogram.observe(float(value))

    def note_record_error(self) -> int:
        with self._lock:
            self.record_errors += 1
            return self.record_errors

    def snapshot(self) -> VllmSnapshot:
        with self._lock:
            return VllmSnapshot(dict(self._counters), dict(self._gauges),
                                {name: h.snapshot() for name, h in self._histograms.items()},
                                self.record_errors, self.loggers_attached)


def stats_of(engine: Any) -> VllmStats:
    """The VllmStats of ``engine`` (a VllmEngine), made on first use: the engine's AsyncLLMs record into it
    (engine.py passes ``stat_logger_factory(stats_of(self))``), its model's GaugeExporter reads it
    (triton_io.engine_sources), whichever comes first."""
    stats = getattr(engine, "vllm_stats", None)
    if stats is None:
        stats = VllmStats()
        engine.vllm_stats = stats
    return stats


def stat_logger_factory(stats: VllmStats) -> Callable[[Any, int], Any]:
    """For ``AsyncLLM.from_engine_args(..., stat_loggers=[...])``: a per-engine factory, called by vLLM's
    StatLoggerManager as ``factory(vllm_config, engine_index)`` (a function, not a class: vLLM wraps it in a
    PerEngineStatLoggerAdapter). Imports vLLM."""
    return functools.partial(_logger_class(), stats=stats)


@functools.cache
def _logger_class() -> type:
    from vllm.v1.metrics.buckets import histogram_buckets
    from vllm.v1.metrics.loggers import StatLoggerBase

    class TritonStatLogger(StatLoggerBase):
        """vLLM StatLoggerBase (0.32: ``record(scheduler_stats, iteration_stats, mm_cache_stats, engine_idx)``)
        that records what vLLM's PrometheusStatLogger records, into a VllmStats."""

        def __init__(self, vllm_config: Any, engine_index: int = 0, *, stats: VllmStats):
            self.stats = stats
            self.engine_index = engine_index
            overrides = vllm_config.observability_config.custom_histogram_buckets
            max_model_len = vllm_config.model_config.max_model_len
            stats.attach({m.name: histogram_buckets(m.bucket_family, max_model_len=max_model_len,
                                                    overrides=overrides)
                          for m in VLLM_METRICS if m.kind == HISTOGRAM})

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            # Called on AsyncLLM's output handler: an exception here would end the handler and fail every
            # request in flight (vLLM propagates it as the engine's error). Metrics never do that.
            try:
                record_step(self.stats, scheduler_stats, iteration_stats, mm_cache_stats)
            except Exception:
                if self.stats.note_record_error() == 1:
                    log.exception("recording vLLM stats failed (the engine carries on; further failures are "
                                  "counted, not logged)")

        def log_engine_initialized(self) -> None:
            pass

    return TritonStatLogger


def record_step(stats: VllmStats, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None) -> None:
    """One engine step's stats (vllm.v1.metrics.stats SchedulerStats / IterationStats / MultiModalCacheStats,
    each may be None) into ``stats``, as PrometheusStatLogger.record does."""
    increments: list[tuple[str, Labels, float]] = []
    gauges: list[tuple[str, float]] = []
    observations: list[tuple[str, float]] = []
    if scheduler_stats is not None:
        gauges += [("vllm:num_requests_running", scheduler_stats.num_running_reqs),
                   ("vllm:num_requests_waiting",
                    scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs),
                   ("vllm:kv_cache_usage_perc", scheduler_stats.kv_cache_usage)]
        prefix = scheduler_stats.prefix_cache_stats
        increments += [("vllm:prefix_cache_queries_total", (), prefix.queries),
                       ("vllm:prefix_cache_hits_total", (), prefix.hits)]
        connector = scheduler_stats.connector_prefix_cache_stats
        if connector is not None:
            increments += [("vllm:external_prefix_cache_queries_total", (), connector.queries),
                           ("vllm:external_prefix_cache_hits_total", (), connector.hits)]
    if mm_cache_stats is not None:
        increments += [("vllm:mm_cache_queries_total", (), mm_cache_stats.queries),
                       ("vllm:mm_cache_hits_total", (), mm_cache_stats.hits)]
    if iteration_stats is not None:
        prompt = iteration_stats.prompt_token_stats
        increments += [("vllm:prompt_tokens_total", (), prompt.total),
                       ("vllm:prompt_tokens_cached_total", (), prompt.cached_tokens),
                       ("vllm:generation_tokens_total", (), iteration_stats.num_generation_tokens),
                       ("vllm:num_preemptions_total", (), iteration_stats.num_preempted_reqs)]
        observations.append(("vllm:iteration_tokens_total", prompt.computed + iteration_stats.num_generation_tokens))
        observations += [("vllm:time_to_first_token_seconds", v) for v in iteration_stats.time_to_first_tokens_iter]
        observations += [("vllm:inter_token_latency_seconds", v) for v in iteration_stats.inter_token_latencies_iter]
        for finished in iteration_stats.finished_requests:
            increments.append(("vllm:request_success_total", (("finished_reason", str(finished.finish_reason)),), 1))
            observations += [
                ("vllm:e2e_request_latency_seconds", finished.e2e_latency),
                ("vllm:request_queue_time_seconds", finished.queued_time),
                ("vllm:request_prefill_time_seconds", finished.prefill_time),
                ("vllm:request_inference_time_seconds", finished.inference_time),
                ("vllm:request_decode_time_seconds", finished.decode_time),
                ("vllm:request_prompt_tokens", finished.num_prompt_tokens),
                ("vllm:request_generation_tokens", finished.num_generation_tokens),
                ("vllm:request_time_per_output_token_seconds", finished.mean_time_per_output_token),
            ]
    stats.apply(increments, gauges, observations)


def stat_loggers_for(engine: Any) -> list[Callable[[Any, int], Any]]:
    """``stat_loggers`` for every AsyncLLM ``engine`` (a VllmEngine) makes, its first and its restarts."""
    return [stat_logger_factory(stats_of(engine))]
