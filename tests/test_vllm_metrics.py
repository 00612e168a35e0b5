"""vLLM's own metrics through Triton's metrics endpoint (mmtriton.vllm_metrics, triton_io.VllmMetricsExport) and
the stage histograms (metrics.StageTimes, triton_io.HistogramExport).

Unit tests drive the stat logger with real vLLM stat objects (vllm.v1.metrics.stats; importing vLLM takes ~10 s)
into a small fake of Triton's metric families that keeps whole histograms (tests/fakes keeps only their sums).
The live test uses the session's tritonserver (conftest.triton_server): no server of its own.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace
from typing import Any

import pytest
from fakes.install import install_fake_pb_utils

install_fake_pb_utils()

from mmtriton import triton_io, vllm_metrics  # noqa: E402 - after the fake backend module
from mmtriton.metrics import Histogram, StageTimes, replay  # noqa: E402


# --- a Triton metrics registry that keeps histograms whole --------------------------------------------------------
class _Registry:
    def __init__(self) -> None:
        self.families: dict[str, tuple[str, Any]] = {}
        self.metrics: dict[tuple[str, tuple], Any] = {}


class FakeMetric:
    def __init__(self, kind: Any, buckets: list[float] | None):
        self.kind, self.buckets = kind, buckets
        self.value = 0.0
        self.observed: list[float] = []
        self.calls = 0

    def increment(self, value: float) -> None:
        assert self.kind == triton_io.pb_utils.MetricFamily.COUNTER and value >= 0
        self.value += value
        self.calls += 1

    def set(self, value: float) -> None:
        assert self.kind == triton_io.pb_utils.MetricFamily.GAUGE
        self.value = value
        self.calls += 1

    def observe(self, value: float) -> None:
        assert self.kind == triton_io.pb_utils.MetricFamily.HISTOGRAM
        self.observed.append(value)
        self.calls += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(le, count) as the endpoint's ``_bucket`` series shows it."""
        return [(le, sum(v <= le for v in self.observed)) for le in (*self.buckets, math.inf)]


def fake_family(registry: _Registry):
    pb = triton_io.pb_utils

    class FakeFamily:
        COUNTER, GAUGE, HISTOGRAM = pb.MetricFamily.COUNTER, pb.MetricFamily.GAUGE, pb.MetricFamily.HISTOGRAM

        def __init__(self, name: str, description: str, kind: Any):
            # prometheus-cpp: one help text and kind per family name.
            assert registry.families.setdefault(name, (description, kind)) == (description, kind), name
            self.name, self.kind = name, kind

        def Metric(self, labels: dict[str, str], buckets: list[float] | None = None):  # noqa: N802
            assert (buckets is not None) == (self.kind == self.HISTOGRAM) and (buckets is None or
                                                                               isinstance(buckets, list))
            key = (self.name, tuple(sorted(labels.items())))
            return registry.metrics.setdefault(key, FakeMetric(self.kind, buckets))

    return FakeFamily


@pytest.fixture
def registry(monkeypatch) -> _Registry:
    reg = _Registry()
    monkeypatch.setattr(triton_io.pb_utils, "MetricFamily", fake_family(reg))
    return reg


def metric_of(registry: _Registry, name: str, **labels: str) -> FakeMetric:
    return registry.metrics[(name, tuple(sorted(labels.items())))]


# --- real vLLM stat objects -----------------------------------------------------------------------------------------
VLLM_CONFIG = SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096),
                              observability_config=SimpleNamespace(custom_histogram_buckets=None))


def new_logger(stats: vllm_metrics.VllmStats):
    """A stat logger as vLLM's StatLoggerManager makes one: factory(vllm_config, engine_index)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    logger = vllm_metrics.stat_logger_factory(stats)(VLLM_CONFIG, 0)
    assert isinstance(logger, StatLoggerBase)
    return logger


def engine_step(prompt_tokens: int = 0, cached: int = 0, generated: int = 0, ttfts=(), itls=(), finished=(),
                running: int = 0, waiting: int = 0, kv_usage: float = 0.0):
    """(SchedulerStats, IterationStats) of one engine step, filled the way vLLM's output processor fills them."""
    from vllm.v1.metrics.stats import (
        FinishedRequestStats,
        IterationStats,
        PrefillStats,
        PrefixCacheStats,
        SchedulerStats,
    )

    prefix = PrefixCacheStats()
    if prompt_tokens:
        prefix.record(num_tokens=prompt_tokens, num_hits=cached, preempted=False)
    scheduler = SchedulerStats(num_running_reqs=running, num_waiting_reqs=waiting, kv_cache_usage=kv_usage,
                               prefix_cache_stats=prefix)
    iteration = IterationStats()
    if prompt_tokens:
        prefill = PrefillStats()
        prefill.set(num_prompt_tokens=prompt_tokens, num_local_cached_tokens=cached, num_external_cached_tokens=0)
        iteration.prompt_token_stats.update_from_output(prefill)
    iteration.num_generation_tokens = generated
    iteration.time_to_first_tokens_iter = list(ttfts)
    iteration.inter_token_latencies_iter = list(itls)
    iteration.finished_requests = [FinishedRequestStats(**f) for f in finished]
    return scheduler, iteration


def finished_request(reason: str = "length", e2e: float = 1.2, prompt: int = 40, generated: int = 3) -> dict:
    from vllm.v1.engine import FinishReason

    return dict(finish_reason=FinishReason[reason.upper()], e2e_latency=e2e, num_prompt_tokens=prompt,
                num_generation_tokens=generated, queued_time=0.01, prefill_time=0.2, inference_time=1.1,
                decode_time=0.9, mean_time_per_output_token=0.45)


# --- the stat logger -----------------------------------------------------------------------------------------------
def test_stat_logger_records_what_vllms_prometheus_logger_records() -> None:
    stats = vllm_metrics.VllmStats()
    logger = new_logger(stats)
    logger.record(*engine_step(prompt_tokens=40, cached=16, generated=1, ttfts=[0.3], running=1, waiting=2,
                               kv_usage=0.25))
    logger.record(*engine_step(generated=1, itls=[0.02], running=1))
    logger.record(*engine_step(generated=1, itls=[0.7], finished=[finished_request()]), mm_cache_stats=None)
    snap = stats.snapshot()
    counter = {name: value for (name, _labels), value in snap.counters.items()}
    assert (counter["vllm:prompt_tokens_total"], counter["vllm:prompt_tokens_cached_total"],
            counter["vllm:generation_tokens_total"]) == (40, 16, 3)
    assert (counter["vllm:prefix_cache_queries_total"], counter["vllm:prefix_cache_hits_total"]) == (40, 16)
    assert snap.counters[("vllm:request_success_total", (("finished_reason", "length"),))] == 1
    # Gauges are the last step's (running 1 → 0 once it finished).
    assert snap.gauges == {"vllm:num_requests_running": 0, "vllm:num_requests_waiting": 0,
                           "vllm:kv_cache_usage_perc": 0.0}
    ttft, itl = snap.histograms["vllm:time_to_first_token_seconds"], snap.histograms["vllm:inter_token_latency_seconds"]
    assert (ttft.count, ttft.sum) == (1, 0.3) and (itl.count, pytest.approx(itl.sum)) == (2, 0.72)
    assert dict(itl.cumulative())[0.025] == 1 and dict(itl.cumulative())[0.75] == 2  # vLLM 0.32's own bounds
    assert snap.histograms["vllm:e2e_request_latency_seconds"].sum == 1.2
    assert snap.histograms["vllm:request_prompt_tokens"].sum == 40
    assert snap.histograms["vllm:iteration_tokens_total"].count == 3  # one per step with outputs
    assert snap.histograms["vllm:iteration_tokens_total"].sum == 24 + 3  # computed prompt tokens + generated


def test_a_failing_record_never_raises_and_is_counted() -> None:
    stats = vllm_metrics.VllmStats()
    logger = new_logger(stats)
    scheduler, iteration = engine_step(prompt_tokens=8, generated=1)
    iteration.finished_requests = [object()]  # a stats object without the fields: record_step raises inside
    logger.record(scheduler, iteration)  # would end AsyncLLM's output handler (and the engine) if it raised
    assert stats.snapshot().record_errors == 1
    logger.record(*engine_step(prompt_tokens=8, generated=1))
    assert stats.snapshot().counters[("vllm:prompt_tokens_total", ())] == 8


def test_a_restarted_engines_logger_carries_the_counters_on() -> None:
    stats = vllm_metrics.VllmStats()
    new_logger(stats).record(*engine_step(prompt_tokens=10, generated=1, ttfts=[0.1], running=3, kv_usage=0.5))
    restarted = new_logger(stats)  # VllmEngine._watch: a new AsyncLLM, a new logger, the same store
    snap = stats.snapshot()
    assert snap.loggers_attached == 2
    assert snap.gauges["vllm:num_requests_running"] == 0 and snap.gauges["vllm:kv_cache_usage_perc"] == 0
    restarted.record(*engine_step(prompt_tokens=5, generated=1, ttfts=[0.2]))
    snap = stats.snapshot()
    assert snap.counters[("vllm:prompt_tokens_total", ())] == 15
    assert snap.histograms["vllm:time_to_first_token_seconds"].count == 2


def test_the_engine_passes_the_logger_to_every_asyncllm() -> None:
    engine = SimpleNamespace()
    loggers = vllm_metrics.stat_loggers_for(engine)
    assert vllm_metrics.stats_of(engine) is engine.vllm_stats  # the exporter and the loggers share one store
    loggers[0](VLLM_CONFIG, 0).record(*engine_step(prompt_tokens=3))
    assert engine.vllm_stats.snapshot().counters[("vllm:prompt_tokens_total", ())] == 3


def test_a_restarted_engine_gets_a_logger_on_the_same_store(monkeypatch) -> None:
    """VllmEngine._watch replaces a dead AsyncLLM: the new one must get stat_loggers recording where the
    exporter reads (vllm_metrics.stats_of(engine)). vLLM itself is faked here: only the watchdog runs."""
    from fakes.engines import restart_dead_engine

    from mmtriton.engine import VllmEngine

    engine = VllmEngine({"model": "m"}, on_death="restart")
    store = vllm_metrics.stats_of(engine)  # the exporter's view, taken before the restart
    new_logger(store).record(*engine_step(prompt_tokens=4))
    given = [loggers for _args, loggers in restart_dead_engine(monkeypatch, engine)]
    assert engine.restarts == 1 and len(given) == 1 and len(given[0]) == 1
    given[0][0](VLLM_CONFIG, 0).record(*engine_step(prompt_tokens=6))  # as vLLM's StatLoggerManager would
    assert store.snapshot().counters[("vllm:prompt_tokens_total", ())] == 10


# --- the Triton side -----------------------------------------------------------------------------------------------
def test_vllm_families_are_published_with_model_and_version_labels(registry) -> None:
    stats = vllm_metrics.VllmStats()
    logger = new_logger(stats)
    export = triton_io.VllmMetricsExport(stats)
    export.publish("llm_decode", "1")
    labels = {"model": "llm_decode", "version": "1"}
    # Every family is there before the first request (a scraper sees 0, not nothing).
    assert metric_of(registry, "vllm:prompt_tokens_total", **labels).value == 0
    assert metric_of(registry, "vllm:time_to_first_token_seconds", **labels).observed == []
    assert registry.families["vllm:time_to_first_token_seconds"][1] == triton_io.pb_utils.MetricFamily.HISTOGRAM

    logger.record(*engine_step(prompt_tokens=40, generated=1, ttfts=[0.3, 0.004], running=2, kv_usage=0.1))
    logger.record(*engine_step(generated=2, itls=[0.02, 0.03], finished=[finished_request("stop")]))
    export.publish("llm_decode", "1")
    assert metric_of(registry, "vllm:prompt_tokens_total", **labels).value == 40
    assert metric_of(registry, "vllm:generation_tokens_total", **labels).value == 3
    assert metric_of(registry, "vllm:request_success_total", finished_reason="stop", **labels).value == 1
    assert metric_of(registry, "vllm:num_requests_running", **labels).value == 0
    ttft = metric_of(registry, "vllm:time_to_first_token_seconds", **labels)
    assert sorted(ttft.observed) == [0.004, 0.3]
    assert dict(ttft.cumulative())[0.005] == 1 and dict(ttft.cumulative())[math.inf] == 2

    # Only what changed goes out again (every call is a round trip to the server).
    calls = {key: m.calls for key, m in registry.metrics.items()}
    export.publish("llm_decode", "1")
    assert {key: m.calls for key, m in registry.metrics.items()} == calls
    logger.record(*engine_step(prompt_tokens=2, generated=1, ttfts=[0.5]))
    export.publish("llm_decode", "1")
    assert metric_of(registry, "vllm:prompt_tokens_total", **labels).value == 42
    assert len(ttft.observed) == 3


def test_engine_sources_export_vllm_metrics_and_stage_histograms(registry) -> None:
    engine = SimpleNamespace(alive=True, restarts=0, cancelled=0, times=StageTimes())
    new_logger(vllm_metrics.stats_of(engine)).record(*engine_step(prompt_tokens=7, generated=1, ttfts=[0.2]))
    engine.times.add("first_token", 0.2)
    engine.times.add("decode", 0.5, count=25)  # one request: 25 tokens after the first, 20 ms each
    exporter = triton_io.GaugeExporter("multimodal_agg", triton_io.engine_sources(engine), interval_s=60)
    try:
        assert metric_of(registry, "vllm:prompt_tokens_total", model="multimodal_agg", version="1").value == 7
        decode = metric_of(registry, "mmtriton_stage_duration_seconds", model="multimodal_agg", item="decode")
        assert len(decode.observed) == 25 and pytest.approx(sum(decode.observed)) == 0.5
        assert dict(decode.cumulative())[0.01] == 0 and dict(decode.cumulative())[0.025] == 25
        # The sum / count gauges stay, equal to the histogram's _sum / _count.
        assert metric_of(registry, "mmtriton_stage_seconds", model="multimodal_agg", item="decode").value == 0.5
        assert metric_of(registry, "mmtriton_stage_count", model="multimodal_agg", item="decode").value == 25
        assert metric_of(registry, "mmtriton_engine", model="multimodal_agg", item="stat_errors").value == 0
    finally:
        exporter.stop()


def test_a_failing_export_does_not_stop_the_others(registry) -> None:
    class Broken(triton_io.MetricsExport):
        def publish(self, model: str, version: str) -> None:
            raise RuntimeError("broken export")

    times = StageTimes()
    times.add("encode", 0.01)
    exporter = triton_io.GaugeExporter("encoder_image", {"broken": Broken(), **triton_io.stage_time_sources(times)},
                                       interval_s=60)  # constructing it must not raise either
    try:
        assert metric_of(registry, "mmtriton_stage_duration_seconds", model="encoder_image", item="encode").observed
        with pytest.raises(RuntimeError, match="broken export"):
            exporter.refresh()
    finally:
        exporter.stop()


def test_replay_keeps_each_bucket_exact() -> None:
    histogram = Histogram([0.1, 0.2])
    for value in (0.1, 0.1, 0.1, 0.15, 0.3):  # 0.1 * 3 / 3 may round above 0.1: it must stay in le=0.1
        histogram.observe(value)
    first = histogram.snapshot()
    out = replay(None, first)
    assert [(times, value <= 0.1) for value, times in out][0] == (3, True)
    assert sum(times for _v, times in out) == 5 and pytest.approx(sum(v * t for v, t in out)) == 0.75
    histogram.observe(0.05)
    [(value, times)] = replay(first, histogram.snapshot())
    assert (pytest.approx(value), times) == (0.05, 1)


# --- live: the session's tritonserver ------------------------------------------------------------------------------
ENGINE_MODELS = ("multimodal_agg", "llm_prefill", "llm_decode")  # every model that owns a vLLM engine


@pytest.mark.integration
def test_vllm_metrics_on_the_metrics_endpoint(triton_server) -> None:
    from client import build_inputs, generate_http
    from conftest import metric_value, metrics_text

    def scrape(name: str, model: str = "multimodal_agg", **labels: str) -> float:
        return metric_value(metrics_text(triton_server), name, default=0.0, model=model, version="1", **labels)

    names = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_count",
             "vllm:e2e_request_latency_seconds_count", "vllm:inter_token_latency_seconds_count")
    before = {name: scrape(name) for name in names}
    before_length = scrape("vllm:request_success_total", finished_reason="length")
    sent = [generate_http(triton_server.config.http_url, "multimodal_agg",
                          build_inputs(f"Count to {n}", sampling={"max_tokens": 6 + n, "temperature": 0.0,
                                                                  "ignore_eos": True}, stream=False))
            for n in range(3)]
    prompt_tokens = sum(int(r["num_input_tokens"]) for r in sent)
    output_tokens = sum(int(r["num_output_tokens"]) for r in sent)
    want = {"vllm:prompt_tokens_total": prompt_tokens, "vllm:generation_tokens_total": output_tokens,
            "vllm:time_to_first_token_seconds_count": 3, "vllm:e2e_request_latency_seconds_count": 3,
            "vllm:inter_token_latency_seconds_count": output_tokens - 3}
    deadline = time.monotonic() + 5  # > the exporter's refresh interval
    while time.monotonic() < deadline:
        got = {name: scrape(name) - before[name] for name in names}
        if got == want:
            break
        time.sleep(0.3)
    assert got == want
    assert scrape("vllm:request_success_total", finished_reason="length") - before_length == 3
    text = metrics_text(triton_server)
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in text
    for engine_model in ENGINE_MODELS:
        for family in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                       "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
            assert f'{family}{{model="{engine_model}",version="1"}}' in text, (family, engine_model)
        assert f'vllm:time_to_first_token_seconds_bucket{{model="{engine_model}",version="1",le="+Inf"}}' in text
    assert 'mmtriton_stage_duration_seconds_count{item="first_token",model="multimodal_agg"}' in text
