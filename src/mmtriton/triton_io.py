"""Triton Python-backend glue: tensors in, responses out, a response thread, errors with the right code.

Only the models' Triton sides import this (``model_repository/*/1/model.py`` and ``triton_agg`` / ``triton_bls`` /
``triton_encoder``): it needs ``triton_python_backend_utils``, which exists only inside the backend stub (tests use
the fake under ``tests/fakes/``). Everything it calls into is plain Python.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from mmtriton import vllm_metrics
from mmtriton.engine import EngineDead, GenerationChunk
from mmtriton.media.errors import MediaUnavailable
from mmtriton.metrics import HistogramSnapshot, replay
from mmtriton.protocol import CLIENT_ERROR_PREFIX, UNAVAILABLE_PREFIX, InvalidInput
from mmtriton.settings import Settings
from mmtriton.vllm_metrics import Labels, VllmStats


def auto_complete(config, inputs: Iterable[dict[str, Any]], outputs: Iterable[dict[str, Any]], decoupled: bool):
    """Own the I/O contract in code: add what config.pbtxt leaves out."""
    present = config.as_dict()
    have_in = {i["name"] for i in present.get("input", [])}
    have_out = {o["name"] for o in present.get("output", [])}
    for spec in inputs:
        if spec["name"] not in have_in:
            config.add_input(spec)
    for spec in outputs:
        if spec["name"] not in have_out:
            config.add_output(spec)
    config.set_model_transaction_policy(dict(decoupled=decoupled))
    config.set_max_batch_size(0)
    return config


def model_parameters(args: Mapping[str, str]) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def load_settings(args: Mapping[str, str]) -> Settings:
    """Settings for a model; with no model configured, the embedded tiny model (built on first use)."""
    settings = Settings.load(model_parameters(args))
    if not settings.model:
        from mmtriton.tiny_models import ensure_tiny_models

        ensure_tiny_models()
    return settings


def read_inputs(request, names: Iterable[str]) -> dict[str, np.ndarray | None]:
    out: dict[str, np.ndarray | None] = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        out[name] = None if tensor is None else tensor.as_numpy()
    return out


def chunk_response(chunk: GenerationChunk):
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("text_output", np.array([chunk.text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("token_ids", np.array(chunk.token_ids, dtype=np.int64)),
            pb_utils.Tensor("finish_reason", np.array([chunk.finish_reason.encode()], dtype=np.object_)),
            pb_utils.Tensor("num_input_tokens", np.array([chunk.num_input_tokens], dtype=np.uint32)),
            pb_utils.Tensor("num_output_tokens", np.array([chunk.num_output_tokens], dtype=np.uint32)),
        ]
    )


def error_code_and_message(exc: BaseException) -> tuple[Any, str]:
    """The error's class goes into its text too (protocol.error_class): Triton 2.51 loses the code on the way."""
    if isinstance(exc, InvalidInput):
        code, message = pb_utils.TritonError.INVALID_ARG, CLIENT_ERROR_PREFIX + str(exc)
    elif isinstance(exc, EngineDead | MediaUnavailable):  # a stage down, an upstream media host failing: retry
        code, message = pb_utils.TritonError.UNAVAILABLE, UNAVAILABLE_PREFIX + str(exc)
    else:
        code, message = pb_utils.TritonError.INTERNAL, str(exc)
    # An empty message would read as no error at all on some clients: always name the class at least.
    if not str(exc).strip():
        message = message.rstrip() + (" " if message.strip() else "") + type(exc).__name__
    return code, message


def error_response(exc: BaseException):
    code, message = error_code_and_message(exc)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


# In-band errors, for a decoupled BLS caller. In Triton 2.51 (python_backend r24.10) an error response that is not
# the first response of a decoupled BLS stream never reaches the caller: InferResponse::SaveToSharedMemory writes
# the response's iterator id only for responses without an error, so the caller's stub files the error under a
# stray id and the caller's iterator waits for good (fixed upstream in r25.04, python_backend #398). A caller that
# sets this request parameter (triton_bls.BlsModel.decode) gets a failure as a normal final response instead: the
# public outputs, finish_reason IN_BAND_ERROR_FINISH and the error's message (class prefix included) as the text.
IN_BAND_ERRORS = "mmtriton_in_band_errors"
IN_BAND_ERROR_FINISH = "mmtriton_error"


def wants_in_band_errors(request) -> bool:
    """Whether the request's caller asked for in-band errors (the IN_BAND_ERRORS request parameter)."""
    try:
        parameters = json.loads(request.parameters() or "{}")
    except (AttributeError, TypeError, ValueError):  # no parameters at all, or not JSON: the default
        return False
    return isinstance(parameters, dict) and parameters.get(IN_BAND_ERRORS) is True


def in_band_error_response(exc: BaseException):
    """The failure as a normal response of the public outputs (see IN_BAND_ERRORS)."""
    _code, message = error_code_and_message(exc)
    return chunk_response(GenerationChunk(text=message, token_ids=[], finish_reason=IN_BAND_ERROR_FINISH,
                                          num_input_tokens=0, num_output_tokens=0, finished=True))


def in_band_error(response) -> str | None:
    """The error message an in-band error response carries; None for any other response."""
    if response.has_error() or finish_reason_of(response) != IN_BAND_ERROR_FINISH:
        return None
    text = pb_utils.get_output_tensor_by_name(response, "text_output")
    message = "" if text is None else "".join(_as_text(v) for v in text.as_numpy().reshape(-1))
    return message or "failed without a message"


def finish_reason_of(response) -> str:
    """A response's finish_reason output ("" while more follows, or when it has none of the contract's shape [1])."""
    finish = pb_utils.get_output_tensor_by_name(response, "finish_reason")
    if finish is None:
        return ""
    values = finish.as_numpy().reshape(-1)
    return _as_text(values[0]) if len(values) == 1 else ""


def _as_text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class ResponseThread:
    """Sends responses off the engine loop, in order; a failed send marks the request cancelled."""

    def __init__(self, logger):
        self.logger = logger
        self._queue: queue.Queue = queue.Queue()
        self._unsent = 0  # put and not yet sent (or failed): what drain() waits for
        self._all_sent = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="triton-responses", daemon=True)
        self._thread.start()

    def put(self, channel: ResponseChannel, response, flags: int) -> None:
        with self._all_sent:
            self._unsent += 1
        self._queue.put_nowait((channel, response, flags))

    def drain(self, timeout_s: float) -> bool:
        """Wait until every response put so far has been handed to Triton (True), or ``timeout_s`` (False). A
        stub that is about to end calls this first: a response still queued when the process ends is lost, and
        its client gets Triton's "Stub process is not healthy" instead of the error that names the cause."""
        with self._all_sent:
            return self._all_sent.wait_for(lambda: self._unsent == 0, timeout=timeout_s)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            channel, response, flags = item
            try:
                response = channel.only_requested(response)
                if response is None:
                    channel.sender.send(flags=flags)
                else:
                    channel.sender.send(response, flags=flags)
                if not flags & FINAL:
                    channel.is_cancelled()  # throttled: at most one ask per CANCEL_POLL_S per request
            except Exception:
                self.logger.log_error(f"sending a response failed: {traceback.format_exc()}")
                channel.cancelled = True
            finally:
                with self._all_sent:
                    self._unsent -= 1
                    self._all_sent.notify_all()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)


def dispatch(requests, responses: ResponseThread, input_names: Iterable[str], submit, handle, model: str) -> None:
    """A decoupled model's ``execute``: each request's tensors go to ``handle(inputs, channel)`` on an event loop
    (``submit``). Any error ends that request with an error response; client errors are not logged as failures."""
    for request in requests:
        channel = ResponseChannel(request, responses)
        try:
            inputs = read_inputs(request, input_names)
            submit(_guarded(handle, inputs, channel, model))
        except Exception as exc:
            channel.fail(exc)


async def _guarded(handle, inputs, channel: ResponseChannel, model: str) -> None:
    try:
        await handle(inputs, channel)
    except Exception as exc:
        if not isinstance(exc, ValueError):
            pb_utils.Logger.log_error(f"{model}: request failed: {traceback.format_exc()}")
        channel.fail(exc)


class EventLoopThread:
    """An asyncio loop on its own thread, for models whose per-request work is asynchronous."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout_s: float = 10.0) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)


class ResponseChannel:
    """One request's way back to its client, usable from any thread."""

    # How often a request asks Triton whether its client is still there. Each ask is a round trip to the
    # server process, so not after every streamed token (that cost ~1 ms per token on 2 cores).
    CANCEL_POLL_S = 0.05

    def __init__(self, request, responses: ResponseThread):
        self.sender = request.get_response_sender()
        # The client's request id; an ensemble gives its steps the id of the ensemble request.
        self.request_id: str = request.request_id() or ""
        self.requested = frozenset(request.requested_output_names())
        # A decoupled BLS caller on 2.51 never sees an error response after the first (see IN_BAND_ERRORS).
        self.in_band_errors = wants_in_band_errors(request)
        self.responses = responses
        self.cancelled = False
        self.closed = False
        self._last_poll = 0.0
        self._poll_lock = threading.Lock()

    def emit(self, chunk: GenerationChunk) -> None:
        self.closed = self.closed or chunk.finished
        self.responses.put(self, chunk_response(chunk), FINAL if chunk.finished else 0)

    def send_final(self, response) -> None:
        self.closed = True
        self.responses.put(self, response, FINAL)

    def send(self, response) -> None:
        self.responses.put(self, response, 0)

    def fail(self, exc: BaseException) -> None:
        if not self.closed:
            self.closed = True
            response = in_band_error_response(exc) if self.in_band_errors else error_response(exc)
            self.responses.put(self, response, FINAL)

    def finish(self) -> None:
        """End the stream with the FINAL flag alone (no response); nothing once it has ended."""
        if not self.closed:
            self.closed = True
            self.responses.put(self, None, FINAL)

    def finish_cancelled(self) -> None:
        self.finish()

    def only_requested(self, response):
        """The response without the outputs the client did not ask for.

        Triton 2.51's stub drops those itself inside ``send`` with the GIL released, and a tensor made from a
        numpy array then frees Python objects without the GIL (fixed upstream in python_backend #390): heap
        corruption under load. Dropping them here, in Python, frees them safely.
        """
        if response is None or not self.requested or response.has_error():
            return response
        tensors = response.output_tensors()
        kept = [t for t in tensors if t.name() in self.requested]
        if len(kept) == len(tensors):
            return response
        return pb_utils.InferenceResponse(output_tensors=kept)

    def is_cancelled(self) -> bool:
        """Called from the engine loop and the response thread; either may be the first to notice. One ask at
        a time: the stub's round trip for it is not made for two threads at once."""
        if self.cancelled:
            return True
        with self._poll_lock:
            now = time.monotonic()
            if now - self._last_poll >= self.CANCEL_POLL_S:
                self._last_poll = now
                if self.sender.is_cancelled():
                    self.cancelled = True
        return self.cancelled


class GaugeExporter:
    """Publishes numbers as Triton custom metrics (on :8002/metrics), refreshed by a background thread.

    ``sources`` maps a metric name to either (help text, a function returning {label value: number}): a gauge
    family whose metrics get the labels model=<model> and item=<label value>; or a ``MetricsExport`` (an object
    with ``publish(model, version)``, e.g. HistogramExport, VllmMetricsExport) that owns its families. Each
    source is refreshed on its own: one failing never stops the others or the thread.
    """

    def __init__(self, model: str, sources: dict[str, tuple[str, Callable[[], dict[str, float]]] | MetricsExport],
                 interval_s: float = 0.5, version: str = "1"):
        self.model = model
        self.version = version
        self.sources = {name: s for name, s in sources.items() if isinstance(s, tuple)}
        self.exports = [s for s in sources.values() if not isinstance(s, tuple)]
        self.interval_s = interval_s
        self.families = {
            name: pb_utils.MetricFamily(name=name, description=text, kind=pb_utils.MetricFamily.GAUGE)
            for name, (text, _fn) in self.sources.items()
        }
        self.gauges: dict[tuple[str, str], Any] = {}
        self._published: dict[tuple[str, str], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{model}-metrics", daemon=True)
        self._failures = 0
        self._refresh_logged()
        self._thread.start()

    def refresh(self) -> None:
        """Publish every source once; raises the first failure after trying them all."""
        failure: Exception | None = None
        for name, (_text, fn) in self.sources.items():
            try:
                for item, value in fn().items():
                    key = (name, item)
                    if key not in self.gauges:
                        self.gauges[key] = self.families[name].Metric(labels={"model": self.model, "item": item})
                    # Only what changed: a gauge's set is a round trip to the server that holds the GIL.
                    if self._published.get(key) != float(value):
                        self.gauges[key].set(float(value))
                        self._published[key] = float(value)
            except Exception as exc:
                failure = failure or exc
        for export in self.exports:
            try:
                export.publish(self.model, self.version)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def _refresh_logged(self) -> None:
        try:
            self.refresh()
        except Exception:  # metrics must never take the model down; the first failure is logged
            self._failures += 1
            if self._failures == 1:
                pb_utils.Logger.log_error(f"{self.model}: publishing metrics failed: {traceback.format_exc()}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._refresh_logged()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


class MetricsExport:
    """A GaugeExporter source that owns its Triton families (made on first publish, on the exporter's thread)."""

    def publish(self, model: str, version: str) -> None:
        raise NotImplementedError


def _observe_replay(metric: Any, before: HistogramSnapshot | None, after: HistogramSnapshot) -> None:
    """Triton histograms only take single observations (``observe``: one round trip each, without the GIL)."""
    for value, times in replay(before, after):
        for _ in range(times):
            metric.observe(value)


class HistogramExport(MetricsExport):
    """One Triton HISTOGRAM family from ``fn() -> {item: HistogramSnapshot}`` (labels model, item); each publish
    observes what was added since the last one (metrics.replay: exact buckets, count and sum)."""

    def __init__(self, name: str, description: str, fn: Callable[[], dict[str, HistogramSnapshot]]):
        self.name, self.description, self.fn = name, description, fn
        self._family: Any = None
        self._metrics: dict[tuple[str, str], Any] = {}
        self._published: dict[tuple[str, str], HistogramSnapshot] = {}

    def publish(self, model: str, version: str) -> None:
        if self._family is None:
            self._family = pb_utils.MetricFamily(name=self.name, description=self.description,
                                                 kind=pb_utils.MetricFamily.HISTOGRAM)
        for item, snapshot in self.fn().items():
            key = (model, item)
            if key not in self._metrics:
                self._metrics[key] = self._family.Metric(labels={"model": model, "item": item},
                                                         buckets=list(snapshot.bounds))
            before = self._published.get(key)
            self._published[key] = snapshot  # first: a failing observe loses this interval, never counts it twice
            _observe_replay(self._metrics[key], before, snapshot)


class VllmMetricsExport(MetricsExport):
    """vLLM's own metric families (mmtriton.vllm_metrics.VLLM_METRICS) from a VllmStats, labelled model and
    version as triton-inference-server/vllm_backend labels them. Counters are published as increments since the
    last publish, gauges when they changed, histograms as their new observations (Triton 2.51's python backend
    has HISTOGRAM families: r24.10 pb_stub.cc). Every family and metric known so far is created on the first
    publish, so a scraper sees them (at 0) before the first request."""

    def __init__(self, stats: VllmStats):
        self.stats = stats
        self._families: dict[str, Any] = {}
        self._metrics: dict[tuple[str, Labels], Any] = {}
        self._counters: dict[tuple[str, Labels], float] = {}
        self._gauges: dict[str, float] = {}
        self._histograms: dict[str, HistogramSnapshot] = {}

    def _metric(self, name: str, labels: Labels, base: dict[str, str], buckets: list[float] | None = None):
        key = (name, labels)
        if key not in self._metrics:
            if name not in self._families:
                spec = vllm_metrics.METRICS_BY_NAME[name]
                kind = {vllm_metrics.COUNTER: pb_utils.MetricFamily.COUNTER,
                        vllm_metrics.GAUGE: pb_utils.MetricFamily.GAUGE,
                        vllm_metrics.HISTOGRAM: pb_utils.MetricFamily.HISTOGRAM}[spec.kind]
                self._families[name] = pb_utils.MetricFamily(name=name, description=spec.help, kind=kind)
            all_labels = {**base, **dict(labels)}
            self._metrics[key] = (self._families[name].Metric(labels=all_labels) if buckets is None
                                  else self._families[name].Metric(labels=all_labels, buckets=buckets))
        return self._metrics[key]

    def publish(self, model: str, version: str) -> None:
        base = {"model": model, "version": version}
        snapshot = self.stats.snapshot()
        counters = {(m.name, ()): 0.0 for m in vllm_metrics.VLLM_METRICS if m.kind == vllm_metrics.COUNTER
                    and m.name != "vllm:request_success_total"}  # that one has a label per finish reason
        counters.update(snapshot.counters)
        for key, total in counters.items():
            metric = self._metric(*key, base)
            delta = total - self._counters.get(key, 0.0)
            if delta > 0:
                self._counters[key] = total
                metric.increment(delta)
        for name, value in snapshot.gauges.items():
            metric = self._metric(name, (), base)
            if self._gauges.get(name) != value:
                self._gauges[name] = value
                metric.set(value)
        for name, histogram in snapshot.histograms.items():
            metric = self._metric(name, (), base, buckets=list(histogram.bounds))
            before = self._histograms.get(name)
            self._histograms[name] = histogram
            _observe_replay(metric, before, histogram)


def engine_sources(engine) -> dict[str, tuple[str, Callable[[], dict[str, float]]] | MetricsExport]:
    """GaugeExporter sources for a model that owns a VllmEngine: its health gauge, its stage times and vLLM's own
    metrics (``vllm:*``, recorded by the engine's stat logger: mmtriton.vllm_metrics)."""
    stats = vllm_metrics.stats_of(engine)
    return {
        "mmtriton_engine": ("vLLM engine state: alive (1/0), restarts after crashes, requests cancelled, vLLM "
                            "stat-logger failures (stat_errors)",
                            lambda: {"alive": float(engine.alive), "restarts": engine.restarts,
                                     "cancelled": engine.cancelled, "stat_errors": stats.record_errors}),
        **stage_time_sources(engine.times),
        "vllm": VllmMetricsExport(stats),
    }


def stage_time_sources(times) -> dict[str, tuple[str, Callable[[], dict[str, float]]] | MetricsExport]:
    """GaugeExporter sources for a StageTimes (the same names and help in every model, as Triton requires)."""
    return {
        "mmtriton_stage_seconds": ("Seconds spent per pipeline stage, summed (item = stage)", times.sums),
        "mmtriton_stage_count": ("Stage executions (tokens for decode) counted (item = stage)", times.counts),
        "mmtriton_stage_duration_seconds": HistogramExport(
            "mmtriton_stage_duration_seconds",
            "Seconds per pipeline stage execution (item = stage; decode: per token, the request's mean)",
            times.histograms),
    }
