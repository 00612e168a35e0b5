"""The Triton glue (mmtriton.triton_io and the encoder adapter) without a server.

``triton_python_backend_utils`` exists only inside Triton's backend stub; tests/fakes/ holds a stand-in built on the
real pure-Python file of Triton 2.51 plus Python versions of the stub's C++ classes (response sender rules, BLS
wire conversions, metrics), installed here in sys.modules before anything imports the glue. No vLLM engine, no
tritonserver; the whole file runs in a few seconds (most of it importing torch for the encoder adapter).
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
import types
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from fakes.install import install_fake_pb_utils

_ROOT = Path(__file__).resolve().parents[1]


pb_utils = install_fake_pb_utils()

from mmtriton import protocol, triton_io  # noqa: E402
from mmtriton.engine import EngineDead, GenerationChunk  # noqa: E402
from mmtriton.metrics import StageTimes  # noqa: E402
from mmtriton.protocol import InvalidInput, error_class  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
OUTPUT_NAMES = [o["name"] for o in protocol.OUTPUTS]


@pytest.fixture(autouse=True)
def _fresh_fake():
    pb_utils.reset()
    yield
    pb_utils.reset()


@pytest.fixture(scope="module")
def responses():
    thread = triton_io.ResponseThread(pb_utils.Logger)
    yield thread
    thread.stop(timeout_s=2)


@pytest.fixture(scope="module")
def loop_thread():
    loop = triton_io.EventLoopThread("test-glue-loop")
    yield loop
    loop.stop(timeout_s=2)


class Submitter:
    """``submit`` for dispatch that keeps the futures, so a test can wait until every handler has returned."""

    def __init__(self, loop_thread: triton_io.EventLoopThread):
        self.loop_thread = loop_thread
        self.futures: list[Future] = []

    def __call__(self, coro) -> Future:
        future = self.loop_thread.submit(coro)
        self.futures.append(future)
        return future

    def wait(self, timeout_s: float = 5.0) -> None:
        for future in self.futures:
            future.exception(timeout=timeout_s)  # the handlers' errors are _guarded's business, not re-raised here


def drain(responses: triton_io.ResponseThread) -> None:
    """Return once the response thread has handled everything queued so far (it is one FIFO thread)."""
    probe = pb_utils.incoming_request({}, decoupled=True)
    triton_io.ResponseChannel(probe, responses).finish_cancelled()
    probe.get_response_sender().wait_final(5.0)


def text_request(text: str = "hi", requested: list[str] | None = None):
    return pb_utils.incoming_request({"text_input": np.array([text.encode()], dtype=np.object_)},
                                     requested_output_names=OUTPUT_NAMES if requested is None else requested)


def chunk(i: int, last: bool) -> GenerationChunk:
    return GenerationChunk(text=f"t{i}", token_ids=[i], finish_reason="stop" if last else "", num_input_tokens=3,
                           num_output_tokens=i + 1, finished=last)


def run_dispatch(requests, responses, loop_thread, handle, input_names=("text_input",)):
    """Triton's ``execute`` for a decoupled model, then wait for the handlers and the responses they queued."""
    submit = Submitter(loop_thread)
    triton_io.dispatch(requests, responses, list(input_names), submit, handle, "test_model")
    submit.wait()
    for request in requests:
        request.get_response_sender().wait_final(5.0)
    drain(responses)
    assert not [m for m in pb_utils.Logger.logged("ERROR") if "sending a response failed" in m]  # no illegal send
    return [request.get_response_sender().sent for request in requests]


def text_of(response) -> str:
    return pb_utils.get_output_tensor_by_name(response, "text_output").as_numpy()[0].decode()


# --- dispatch, ResponseThread, ResponseChannel ---------------------------------------------------------------------


def test_streamed_chunks_arrive_in_order_and_only_the_last_is_final(responses, loop_thread):
    seen_inputs = []

    async def handle(inputs, channel):
        seen_inputs.append(inputs)
        for i in range(4):
            await asyncio.sleep(0)  # let other work interleave, as the engine loop does
            channel.emit(chunk(i, last=i == 3))

    request = text_request("hello")
    [sent] = run_dispatch([request], responses, loop_thread, handle)

    assert seen_inputs == [{"text_input": np.array([b"hello"], dtype=np.object_)}]
    assert [text_of(r) for r, _ in sent] == ["t0", "t1", "t2", "t3"]
    assert [flags for _, flags in sent] == [0, 0, 0, FINAL]
    last = sent[-1][0]
    assert pb_utils.get_output_tensor_by_name(last, "finish_reason").as_numpy()[0] == b"stop"
    assert pb_utils.get_output_tensor_by_name(last, "num_output_tokens").as_numpy().tolist() == [4]


@pytest.mark.parametrize(("exc", "code", "message", "logged"), [
    (InvalidInput("max_tokens too big"), pb_utils.TritonError.INVALID_ARG, "invalid input: max_tokens too big", False),
    (EngineDead("engine died"), pb_utils.TritonError.UNAVAILABLE, "unavailable: engine died", True),
    (RuntimeError("boom"), pb_utils.TritonError.INTERNAL, "boom", True),
])
def test_a_failing_handler_ends_its_request_with_one_error_response(responses, loop_thread, exc, code, message,
                                                                    logged):
    async def handle(inputs, channel):
        raise exc

    [sent] = run_dispatch([text_request()], responses, loop_thread, handle)

    assert len(sent) == 1
    response, flags = sent[0]
    assert flags == FINAL and response.has_error() and not response.output_tensors()
    assert response.error().code() == code
    assert response.error().message() == message
    # Client errors are the client's business; everything else is a failure worth a log line with the traceback.
    failures = [m for m in pb_utils.Logger.logged("ERROR") if m.startswith("test_model: request failed")]
    assert len(failures) == (1 if logged else 0)
    if logged:
        assert type(exc).__name__ in failures[0] and "Traceback" in failures[0]


def test_an_error_after_streaming_started_follows_the_chunks_already_sent(responses, loop_thread):
    async def handle(inputs, channel):
        channel.emit(chunk(0, last=False))
        raise EngineDead("engine died mid-stream")

    [sent] = run_dispatch([text_request()], responses, loop_thread, handle)

    assert [flags for _, flags in sent] == [0, FINAL]
    assert text_of(sent[0][0]) == "t0"
    assert sent[1][0].error().message() == "unavailable: engine died mid-stream"


def test_an_error_after_the_final_response_sends_nothing_more(responses, loop_thread):
    async def handle(inputs, channel):
        channel.emit(chunk(0, last=True))
        raise RuntimeError("cleanup failed after the answer")

    [sent] = run_dispatch([text_request()], responses, loop_thread, handle)

    assert [flags for _, flags in sent] == [FINAL]
    assert not sent[0][0].has_error()
    assert any("cleanup failed" in m for m in pb_utils.Logger.logged("ERROR"))  # still logged


def test_a_request_whose_inputs_cannot_be_read_gets_an_error_and_the_others_are_served(responses, loop_thread):
    handled = []

    async def handle(inputs, channel):
        handled.append(inputs)
        channel.emit(chunk(0, last=True))

    unreadable = pb_utils.incoming_request([pb_utils.bf16_tensor("text_input", [1])], OUTPUT_NAMES)
    good = text_request("fine")
    bad_sent, good_sent = run_dispatch([unreadable, good], responses, loop_thread, handle)

    assert len(bad_sent) == 1 and bad_sent[0][1] == FINAL
    assert bad_sent[0][0].error().code() == pb_utils.TritonError.INTERNAL
    assert "BF16" in bad_sent[0][0].error().message()
    assert handled == [{"text_input": np.array([b"fine"], dtype=np.object_)}]
    assert [flags for _, flags in good_sent] == [FINAL] and text_of(good_sent[0][0]) == "t0"


def test_fail_after_close_sends_nothing(responses):
    request = text_request()
    channel = triton_io.ResponseChannel(request, responses)
    channel.send(triton_io.chunk_response(chunk(0, last=False)))
    channel.send_final(triton_io.chunk_response(chunk(1, last=True)))
    channel.fail(RuntimeError("too late"))
    channel.finish_cancelled()
    drain(responses)

    assert [flags for _, flags in request.get_response_sender().sent] == [0, FINAL]
    assert not any(r.has_error() for r, _ in request.get_response_sender().sent)
    assert pb_utils.Logger.logged("ERROR") == []  # not even tried: the fake sender would refuse it, as Triton does


def test_finish_cancelled_sends_an_empty_final_and_closes(responses):
    request = text_request()
    channel = triton_io.ResponseChannel(request, responses)
    channel.send(triton_io.chunk_response(chunk(0, last=False)))
    channel.finish_cancelled()
    channel.fail(RuntimeError("after the cancel"))
    drain(responses)

    sent = request.get_response_sender().sent
    assert [flags for _, flags in sent] == [0, FINAL]
    assert sent[1][0] is None  # send(flags=FINAL) with no response: the only legal way to end without one
    assert pb_utils.Logger.logged("ERROR") == []


def test_a_failing_send_marks_the_channel_cancelled(responses):
    request = text_request()
    channel = triton_io.ResponseChannel(request, responses)
    request.get_response_sender().fail_sends("Unable to send response: the stream is closed.")
    channel.send(triton_io.chunk_response(chunk(0, last=False)))
    drain(responses)

    assert channel.cancelled and channel.is_cancelled()
    assert request.cancel_asks == 0  # known without asking Triton
    assert any("sending a response failed" in m and "stream is closed" in m for m in pb_utils.Logger.logged("ERROR"))


def test_drain_waits_until_every_queued_response_was_sent_and_says_when_it_gave_up(responses, monkeypatch):
    # A stub ending after an engine death drains first: a response still queued at the exit would be lost.
    request = text_request()
    sender = request.get_response_sender()
    real_send = sender.send

    def slow_send(*args, **kwargs):
        time.sleep(0.02)  # a backlog of streamed tokens on a busy server
        real_send(*args, **kwargs)

    monkeypatch.setattr(sender, "send", slow_send)
    channel = triton_io.ResponseChannel(request, responses)
    for i in range(20):
        channel.send(triton_io.chunk_response(chunk(i, last=False)))
    channel.fail(EngineDead("the vLLM engine died"))

    assert responses.drain(timeout_s=0.05) is False  # 21 sends of 20 ms each cannot be done yet
    assert responses.drain(timeout_s=5.0) is True
    assert len(sender.sent) == 21  # nothing left in the queue: the error is out, as the last response
    last, flags = sender.sent[-1]
    assert flags == FINAL and last.has_error() and "engine died" in last.error().message()
    assert responses.drain(timeout_s=0.0) is True  # nothing queued: at once


def test_the_stub_never_has_to_drop_outputs_the_client_did_not_request(responses, loop_thread):
    # Triton 2.51's stub would drop them itself without the GIL (heap corruption); the glue drops them first.
    async def handle(inputs, channel):
        channel.emit(chunk(0, last=False))
        channel.emit(chunk(1, last=True))

    request = text_request(requested=["text_output"])
    [sent] = run_dispatch([request], responses, loop_thread, handle)

    assert [[t.name() for t in r.output_tensors()] for r, _ in sent] == [["text_output"], ["text_output"]]
    assert request.get_response_sender().stub_pruned == []


def test_only_requested_drops_outputs_not_asked_for(responses):
    response = triton_io.chunk_response(chunk(0, last=True))

    some = triton_io.ResponseChannel(text_request(requested=["token_ids", "finish_reason"]), responses)
    kept = some.only_requested(response)
    assert sorted(t.name() for t in kept.output_tensors()) == ["finish_reason", "token_ids"]
    assert kept.output_tensors()[0].as_numpy() is not None and len(response.output_tensors()) == 5  # a new one

    for requested in (OUTPUT_NAMES, []):  # all requested, or none listed: the response as it is
        channel = triton_io.ResponseChannel(text_request(requested=requested), responses)
        assert channel.only_requested(response) is response

    error = triton_io.error_response(InvalidInput("bad"))
    assert some.only_requested(error) is error
    assert some.only_requested(None) is None


# --- cancellation polling --------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_is_cancelled_asks_triton_at_most_once_per_poll_interval(responses, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(triton_io, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    request = text_request()
    channel = triton_io.ResponseChannel(request, responses)
    poll = triton_io.ResponseChannel.CANCEL_POLL_S

    assert not channel.is_cancelled() and request.cancel_asks == 1
    for _ in range(5):
        assert not channel.is_cancelled()
    clock.now += poll * 0.9
    assert not channel.is_cancelled()
    assert request.cancel_asks == 1

    clock.now += poll * 0.2
    request.cancel()
    assert channel.is_cancelled() and request.cancel_asks == 2

    clock.now += poll * 10
    assert channel.is_cancelled() and channel.is_cancelled()
    assert request.cancel_asks == 2  # once cancelled, never asked again


def test_a_cancel_is_noticed_within_one_poll_interval(responses, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(triton_io, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    request = text_request()
    channel = triton_io.ResponseChannel(request, responses)
    assert not channel.is_cancelled()

    request.cancel()
    assert not channel.is_cancelled()  # within the interval: not asked yet
    clock.now += triton_io.ResponseChannel.CANCEL_POLL_S * 1.001  # (exactly one interval is float-fragile)
    assert channel.is_cancelled()


# --- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "kind", "code"), [
    (InvalidInput("messages[0].role 'robot' is not one of system, user, assistant"), "invalid_input",
     pb_utils.TritonError.INVALID_ARG),
    (EngineDead("the vLLM engine died"), "unavailable", pb_utils.TritonError.UNAVAILABLE),
    (RuntimeError("CUDA out of memory"), "internal", pb_utils.TritonError.INTERNAL),
])
def test_error_class_recovers_what_error_response_sent(exc, kind, code):
    error = triton_io.error_response(exc).error()
    assert error.code() == code
    assert error_class(error.message()) == (kind, str(exc))
    # An ensemble puts its step in front of the text; the class still comes back (an internal error keeps it all).
    in_ensemble = f"in ensemble 'multimodal', {error.message()}"
    assert error_class(in_ensemble) == (kind, in_ensemble if kind == "internal" else str(exc))


def test_error_class_survives_a_bls_hop_that_loses_the_code():
    pb_utils.register_model("llm_prefill", lambda request: triton_io.error_response(InvalidInput("prompt too long")))
    request = pb_utils.InferenceRequest(model_name="llm_prefill", inputs=[], requested_output_names=["prefill_result"])
    response = request.exec()

    assert response.error().code() == pb_utils.TritonError.INTERNAL  # what 2.51 does to the code
    assert error_class(response.error().message()) == ("invalid_input", "prompt too long")


# --- auto_complete -------------------------------------------------------------------------------------------------


def test_auto_complete_adds_what_config_pbtxt_leaves_out():
    # What config.pbtxt declares stays as declared (ModelConfig.add_input would refuse the code's other dims).
    declared = {"name": "text_input", "data_type": "TYPE_STRING", "dims": [-1], "optional": True}
    config = pb_utils.model_config("multimodal_agg", inputs=[dict(declared)])

    result = triton_io.auto_complete(config, protocol.INPUTS, protocol.OUTPUTS, decoupled=True)

    as_dict = result.as_dict()
    assert [i["name"] for i in as_dict["input"]] == [i["name"] for i in protocol.INPUTS]  # each once, in order
    assert as_dict["input"][0] == declared
    assert as_dict["output"] == protocol.OUTPUTS
    assert as_dict["model_transaction_policy"] == {"decoupled": True}
    assert as_dict["max_batch_size"] == 0


def test_auto_complete_refuses_a_config_that_says_otherwise():
    # Real ModelConfig rules: the code's contract wins only where config.pbtxt is silent.
    batched = pb_utils.model_config("preprocess", max_batch_size=8)
    with pytest.raises(ValueError, match="max_batch_size"):
        triton_io.auto_complete(batched, protocol.INPUTS, [], decoupled=False)
    not_decoupled = pb_utils.model_config("multimodal_bls", model_transaction_policy={"decoupled": False})
    with pytest.raises(ValueError, match="decoupled"):
        triton_io.auto_complete(not_decoupled, protocol.INPUTS, protocol.OUTPUTS, decoupled=True)


# --- GaugeExporter ---------------------------------------------------------------------------------------------------


def wait_until(condition, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_gauge_exporter_publishes_labelled_values_and_refreshes_them():
    values = {"hits": 3, "misses": 1}
    flaky = {"fail": False}

    def source():
        if flaky["fail"]:
            flaky["fail"] = False
            raise RuntimeError("a source failing once must not stop the exporter")
        return dict(values)

    exporter = triton_io.GaugeExporter("encoder_image", {"mmtriton_media_cache": ("cache stats", source)},
                                       interval_s=0.02)
    try:
        def gauge(item: str) -> float | None:
            return pb_utils.metric_value("mmtriton_media_cache", {"model": "encoder_image", "item": item})

        assert (gauge("hits"), gauge("misses")) == (3.0, 1.0)  # published at construction
        flaky["fail"] = True
        values.update(hits=7, evictions=2)
        assert wait_until(lambda: gauge("hits") == 7.0 and gauge("evictions") == 2.0)
        assert not flaky["fail"]  # the failing refresh happened and the thread carried on
    finally:
        exporter.stop()
    assert not exporter._thread.is_alive()


def test_stage_time_gauges_of_two_models_coexist():
    prefill_times, decode_times = StageTimes(), StageTimes()
    prefill_times.add("prefill", 0.25)
    decode_times.add("decode_tokens", 0.5, count=24)
    exporters = [triton_io.GaugeExporter("llm_prefill", triton_io.stage_time_sources(prefill_times)),
                 triton_io.GaugeExporter("llm_decode", triton_io.stage_time_sources(decode_times))]
    try:
        assert pb_utils.metric_value("mmtriton_stage_seconds", {"model": "llm_prefill", "item": "prefill"}) == 0.25
        assert pb_utils.metric_value("mmtriton_stage_count", {"model": "llm_decode", "item": "decode_tokens"}) == 24
        assert pb_utils.metric_value("mmtriton_stage_count", {"model": "llm_prefill", "item": "decode_tokens"}) is None
    finally:
        for exporter in exporters:
            exporter.stop()


# --- the fake keeps the real sender's rules (what the tests above rely on) -----------------------------------------


def test_fake_sender_enforces_the_real_rules():
    decoupled = pb_utils.incoming_request({}, decoupled=True).get_response_sender()
    with pytest.raises(pb_utils.TritonModelException, match="Unsupported flag"):
        decoupled.send(pb_utils.InferenceResponse(), flags=2)
    with pytest.raises(pb_utils.TritonModelException, match="must be provided"):
        decoupled.send()
    decoupled.send(flags=FINAL)
    with pytest.raises(pb_utils.TritonModelException, match="has been closed"):
        decoupled.send(pb_utils.InferenceResponse(), flags=FINAL)

    plain = pb_utils.incoming_request({}, decoupled=False).get_response_sender()
    plain.send(pb_utils.InferenceResponse())
    with pytest.raises(pb_utils.TritonModelException, match="more than one response"):
        plain.send(pb_utils.InferenceResponse())
    with pytest.raises(TypeError):
        pb_utils.TritonError("code must be an error code, not an int", 3)


def test_fake_bls_calls_look_like_2_51():
    def decode(request):
        assert pb_utils.get_input_tensor_by_name(request, "decode_request").as_numpy().tolist() == [b"{}"]
        return [triton_io.chunk_response(chunk(i, last=i == 1)) for i in range(2)]

    pb_utils.register_model("llm_decode", decode)
    request = pb_utils.InferenceRequest(model_name="llm_decode", requested_output_names=["text_output"],
                                        inputs=[pb_utils.Tensor("decode_request", np.array(["{}"], dtype=np.object_))])
    streamed = list(request.exec(decoupled=True))
    assert [[t.name() for t in r.output_tensors()] for r in streamed] == [["text_output"], ["text_output"], []]

    async def call_async():
        return await request.async_exec(decoupled=True)  # an awaitable giving a plain iterator on 2.51

    assert len(list(asyncio.run(call_async()))) == 3
    assert [r.model_name for r in pb_utils.bls_calls()] == ["llm_decode", "llm_decode"]


# --- encoder_image's model.py --------------------------------------------------------------------------------------


class FakeEncoderService:
    """Plain-Python stand-in for the encoder service behind the adapter: one descriptor per item."""

    def __init__(self) -> None:
        self.batches: list[list[list[str]]] = []
        self.video_options: list = []  # per batch: each request's VideoOptions (or None)

    async def encode_batch(self, requests, video_options=None):
        self.batches.append([[item.url for item in items] for items in requests])
        self.video_options.append(video_options)
        return [[f'{{"url": "{item.url}", "where": "{item.where}", "kind": "{item.kind}"}}' for item in items]
                for items in requests]


def load_model_py(name: str):
    path = _ROOT / "model_repository" / name / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"_test_glue_{name}_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image_request(urls: list[bytes]):
    # encoder_image batches (max_batch_size 8): each request is [1, images].
    return pb_utils.incoming_request({"image_url": np.array([urls], dtype=np.object_)},
                                     requested_output_names=["embeddings"], decoupled=False,
                                     model_name="encoder_image")


def test_encoder_image_batches_requests_and_answers_a_bad_one_alone():
    model = load_model_py("encoder_image").TritonPythonModel()
    model.service = FakeEncoderService()
    model.loop = asyncio.new_event_loop()
    try:
        requests = [image_request([b"http://x/a.png", b"http://x/b.png"]),
                    image_request([b"\xff\xfenot utf-8"]),
                    image_request([b"http://x/c.png"])]
        responses = model.execute(requests)
    finally:
        model.loop.close()

    assert len(responses) == 3
    assert model.service.batches == [[["http://x/a.png", "http://x/b.png"], ["http://x/c.png"]]]  # one pass
    ok_first, bad, ok_last = responses
    assert not ok_first.has_error() and not ok_last.has_error()
    first = pb_utils.get_output_tensor_by_name(ok_first, "embeddings").as_numpy()
    last = pb_utils.get_output_tensor_by_name(ok_last, "embeddings").as_numpy()
    assert first.shape == (1, 2) and last.shape == (1, 1)
    assert b"http://x/b.png" in first[0, 1] and b"image_url[1]" in first[0, 1]
    assert b"http://x/c.png" in last[0, 0]
    assert bad.has_error() and bad.error().code() == pb_utils.TritonError.INVALID_ARG
    assert error_class(bad.error().message()) == ("invalid_input", "image_url[0] is not valid UTF-8")


def encoder_request(inputs: dict[str, list[bytes]]):
    return pb_utils.incoming_request({name: np.array([values], dtype=np.object_) for name, values in inputs.items()},
                                     requested_output_names=["embeddings"], decoupled=False,
                                     model_name="encoder_image")


def test_encoder_image_takes_videos_with_their_labels_and_the_requests_media_options():
    from mmtriton.protocol import VideoOptions

    model = load_model_py("encoder_image").TritonPythonModel()
    model.service = FakeEncoderService()
    model.loop = asyncio.new_event_loop()
    try:
        responses = model.execute([
            encoder_request({"video_url": [b"data:v0", b"data:v1"], "video_label": [b"m[0].c[0]", b"m[0].c[2]"],
                             "image_url": [b"data:i0"], "media_options": [b'{"video": {"num_frames": 4}}']}),
            encoder_request({"video_url": [b"data:v2"], "media_options": [b""]}),
            encoder_request({"video_url": [b"data:v3"], "media_options": [b'{"video": {"frames": 4}}']}),
        ])
    finally:
        model.loop.close()

    assert model.service.batches == [[["data:i0", "data:v0", "data:v1"], ["data:v2"]]]  # images, then videos
    assert model.service.video_options == [[VideoOptions(num_frames=4), None]]
    first = pb_utils.get_output_tensor_by_name(responses[0], "embeddings").as_numpy()
    assert [b'"kind": "video"' in d and b"m[0].c[2]" in d for d in first[0]] == [False, False, True]
    second = pb_utils.get_output_tensor_by_name(responses[1], "embeddings").as_numpy()
    assert b"video_url[0]" in second[0, 0]  # no labels: named by index
    bad = responses[2]
    assert bad.has_error() and bad.error().code() == pb_utils.TritonError.INVALID_ARG
    assert "media_options: not valid media_io_kwargs" in bad.error().message()


def test_bls_sends_images_and_videos_to_encoder_image_and_keeps_the_prompt_order():
    """multimodal_bls → (fake BLS) → encoder_image's real adapter: the encoder answers images then videos; BLS
    puts the descriptors back in the items' order, and the video options arrive as media_options."""
    from mmtriton import triton_bls
    from mmtriton.protocol import MediaIOKwargs, MediaItem, VideoOptions

    encoder = load_model_py("encoder_image").TritonPythonModel()
    encoder.service = FakeEncoderService()
    encoder.loop = asyncio.new_event_loop()
    pb_utils.register_model("encoder_image", lambda request: encoder.execute([request])[0])
    bls = triton_bls.BlsModel()
    bls.timeout_us = 10_000_000
    items = [MediaItem("video", "data:v0", "messages[0].content[0]"),
             MediaItem("image", "data:i0", "messages[0].content[1]"),
             MediaItem("video", "data:v1", "messages[0].content[2]")]
    options = MediaIOKwargs(video=VideoOptions(fps=1.0))
    try:
        descriptors = asyncio.run(bls.encode("image", items, options))
        images_only = asyncio.run(bls.encode("image", items[1:2], options))
    finally:
        encoder.loop.close()

    assert [d.split('"where": "')[1].split('"')[0] for d in descriptors] == [i.where for i in items]
    assert encoder.service.video_options == [[VideoOptions(fps=1.0)], [None]]  # no videos: no media_options sent
    assert len(images_only) == 1
    first_call = pb_utils.bls_calls()[0]
    assert sorted(t.name() for t in first_call.inputs()) == [
        "image_label", "image_url", "media_options", "video_label", "video_url"]
