"""multimodal_bls requests in flight when llm_decode fails mid-answer (its engine killed): they must end with an
error, not hang.

On Triton 2.51 (python_backend r24.10) an error response that is not the first response of a decoupled BLS stream
never reaches the caller's iterator: ``InferResponse::SaveToSharedMemory`` writes the iterator id only for responses
without an error, so the caller's stub files the error under a stray id and ``for response in responses`` waits for
good (fixed upstream in r25.04, python_backend #398). Seen on a real 2.51 server with two toy models: an error sent
as the first response arrived at once; sent after 1, 2 or 5 responses it never arrived (and the callee's send had
returned). So llm_decode answers a BLS caller that asks for it (``triton_io.IN_BAND_ERRORS``) with its failure as a
normal final response, which that stub does deliver.

The fake ``triton_python_backend_utils`` (tests/fakes/) delivers every response; ``Decode251`` below plays llm_decode
with the real Triton glue and hands the caller what the 2.51 stub would, raising where 2.51 would lose the error.
No server, no engine; the file runs in ~3 s (importing torch through mmtriton.disagg).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fakes.install import install_fake_pb_utils

pb_utils = install_fake_pb_utils()

from mmtriton import protocol, triton_bls, triton_io  # noqa: E402
from mmtriton.engine import EngineDead, GenerationChunk  # noqa: E402
from mmtriton.lifetime import ReleaseLater  # noqa: E402
from mmtriton.protocol import InvalidInput  # noqa: E402
from mmtriton.wire import DecodeRequest, PrefillResult  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
OUTPUT_NAMES = [o["name"] for o in protocol.OUTPUTS]


class LostOn251(AssertionError):
    """What the 2.51 stub does with this response: the caller never gets it and waits for good."""


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
    loop = triton_io.EventLoopThread("test-bls-inflight-loop")
    yield loop
    loop.stop(timeout_s=2)


def chunk(i: int) -> GenerationChunk:
    return GenerationChunk(text=f"t{i}", token_ids=[i], finish_reason="", num_input_tokens=3,
                           num_output_tokens=i + 1, finished=False)


def incoming_like(bls_request, model_name: str):
    """The request ``model_name`` receives for a BLS call: its tensors, outputs and parameters."""
    request = pb_utils.incoming_request(bls_request.inputs(), sorted(bls_request.requested_output_names()),
                                        model_name=model_name)
    request._parameters = bls_request.parameters()  # the fake's incoming_request takes no parameters
    return request


def serve_and_collect(request, responses, loop_thread, handle, model: str) -> list:
    """``model``'s execute (the real dispatch, channel and response thread); the responses it sent, in order."""
    triton_io.dispatch([request], responses, ["decode_request"], loop_thread.submit, handle, model)
    return [r for r, _flags in request.get_response_sender().wait_final(5.0) if r is not None]


class Decode251:
    """llm_decode for BLS calls: ``tokens`` chunks, then its engine dies. Runs llm_decode's real Triton side, then
    delivers what the 2.51 stub delivers: an error response after the first is lost (LostOn251)."""

    def __init__(self, responses, loop_thread, tokens: int):
        self.responses, self.loop_thread, self.tokens = responses, loop_thread, tokens

    async def handle(self, inputs, channel) -> None:
        for i in range(self.tokens):
            channel.emit(chunk(i))
            await asyncio.sleep(0)
        raise EngineDead("the vLLM engine died: EngineDeadError")

    def __call__(self, bls_request) -> list:
        sent = serve_and_collect(incoming_like(bls_request, "llm_decode"), self.responses, self.loop_thread,
                                 self.handle, "llm_decode")
        for position, response in enumerate(sent):
            if response.has_error() and position > 0:
                raise LostOn251(f"llm_decode's error response #{position + 1} never reaches the BLS caller on 2.51")
        return sent


def decode_request() -> DecodeRequest:
    return DecodeRequest(prompt="hi", prefill=PrefillResult(kv_transfer_params={}, num_input_tokens=3), stream=True)


def bls_model() -> triton_bls.BlsModel:
    """The parts of BlsModel its decode() uses (initialize builds settings, engines' callers and threads)."""
    model = triton_bls.BlsModel()
    model.timeout_us = 5_000_000
    model.released_late = ReleaseLater(delay_s=0.0)
    return model


@pytest.mark.parametrize("tokens_before", [0, 3])
def test_an_engine_death_mid_answer_reaches_the_bls_client_as_unavailable(responses, loop_thread, tokens_before):
    pb_utils.register_model("llm_decode", Decode251(responses, loop_thread, tokens_before))
    model = bls_model()
    client = pb_utils.incoming_request({"text_input": np.array([b"hi"], dtype=np.object_)}, OUTPUT_NAMES,
                                       model_name="multimodal_bls")

    async def serve(inputs, channel):  # BlsModel.serve once prefill is done: decode on a worker thread
        await asyncio.to_thread(model.decode, decode_request(), channel)

    sent = serve_and_collect(client, responses, loop_thread, serve, "multimodal_bls")

    *tokens, last = sent
    # forward() sends each chunk as it comes; the error ends the answer after them.
    assert [triton_io.in_band_error(r) for r in tokens] == [None] * tokens_before
    assert last.has_error(), sent
    assert last.error().code() == pb_utils.TritonError.UNAVAILABLE
    assert last.error().message() == "unavailable: llm_decode: the vLLM engine died: EngineDeadError"
    [call] = pb_utils.bls_calls()
    assert triton_io.wants_in_band_errors(call)


@pytest.mark.parametrize("in_band", [True, False])
def test_llm_decode_sends_its_failure_in_band_only_to_a_caller_that_asks(responses, loop_thread, in_band):
    """The ensemble (and any other caller) still gets a real error response."""
    bls = pb_utils.InferenceRequest(model_name="llm_decode", requested_output_names=OUTPUT_NAMES,
                                    inputs=[pb_utils.Tensor("decode_request", np.array([b"{}"], dtype=np.object_))],
                                    parameters={triton_io.IN_BAND_ERRORS: True} if in_band else {})
    decode = Decode251(responses, loop_thread, tokens=1)

    sent = serve_and_collect(incoming_like(bls, "llm_decode"), responses, loop_thread, decode.handle, "llm_decode")

    assert len(sent) == 2 and not sent[0].has_error()
    failure = sent[1]
    expected = "unavailable: the vLLM engine died: EngineDeadError"
    if in_band:
        assert not failure.has_error()
        assert triton_io.in_band_error(failure) == expected
        assert sorted(t.name() for t in failure.output_tensors()) == sorted(OUTPUT_NAMES)
    else:
        assert failure.has_error() and failure.error().message() == expected
        assert triton_io.in_band_error(failure) is None


@pytest.mark.parametrize(("exc", "raised", "text"), [
    (InvalidInput("prompt too long"), InvalidInput, "prompt too long"),
    (EngineDead("engine died"), EngineDead, "llm_decode: engine died"),
    (RuntimeError("KV load failed"), RuntimeError, "llm_decode: KV load failed"),
])
def test_an_in_band_error_is_raised_in_its_class_after_the_bls_hop(exc, raised, text):
    pb_utils.register_model("llm_decode", lambda request: [triton_io.in_band_error_response(exc)])
    request = pb_utils.InferenceRequest(model_name="llm_decode", requested_output_names=OUTPUT_NAMES,
                                        inputs=[pb_utils.Tensor("decode_request", np.array([b"{}"], dtype=np.object_))])
    [received, _empty_final] = list(request.exec(decoupled=True))  # BYTES arrive as bytes, as on 2.51

    with pytest.raises(raised) as caught:
        triton_bls.raise_for(received, "llm_decode")
    assert str(caught.value) == text


def test_answers_are_not_taken_for_in_band_errors():
    done = GenerationChunk(text=triton_io.IN_BAND_ERROR_FINISH, token_ids=[1], finish_reason="stop",
                           num_input_tokens=1, num_output_tokens=1, finished=True)
    for response in (triton_io.chunk_response(done), triton_io.chunk_response(chunk(0)),
                     pb_utils.InferenceResponse()):
        assert triton_io.in_band_error(response) is None
        triton_bls.raise_for(response, "llm_decode")  # no exception


def test_the_bls_sends_prefills_first_token_itself_and_decode_goes_on_without_sending_it(responses, loop_thread):
    """A streamed request whose prefill handed over its first token with its text: multimodal_bls sends that token
    before it calls llm_decode (a hop less before the client's first token), and tells llm_decode it did."""
    from mmtriton.wire import FirstToken, parse_stage

    asked: list[DecodeRequest] = []

    async def decode(inputs, channel) -> None:
        asked.append(parse_stage(DecodeRequest, inputs["decode_request"][0].decode(), "decode_request"))
        channel.emit(chunk(1))
        channel.emit(GenerationChunk(text="t2", token_ids=[2], finish_reason="length", num_input_tokens=3,
                                     num_output_tokens=3, finished=True))

    pb_utils.register_model("llm_decode", lambda request: serve_and_collect(
        incoming_like(request, "llm_decode"), responses, loop_thread, decode, "llm_decode"))
    model = bls_model()
    first = FirstToken(token_id=7, text=" seven", prompt_token_ids=[1, 2, 3])
    request = DecodeRequest(prompt="hi", prefill=PrefillResult(kv_transfer_params={}, num_input_tokens=3,
                                                               first_token=first), stream=True)
    client = pb_utils.incoming_request({"text_input": np.array([b"hi"], dtype=np.object_)}, OUTPUT_NAMES,
                                       model_name="multimodal_bls")
    sent = serve_and_collect(client, responses, loop_thread,
                             lambda inputs, channel: model.start_decode(request, channel), "multimodal_bls")

    token_ids = [pb_utils.get_output_tensor_by_name(r, "token_ids").as_numpy().tolist() for r in sent]
    texts = [pb_utils.get_output_tensor_by_name(r, "text_output").as_numpy()[0] for r in sent]
    assert token_ids == [[7], [1], [2]] and texts[0] == b" seven"
    assert [asked[0].first_token_sent, asked[0].prefill.first_token] == [True, first]
    # Not streamed: llm_decode answers once with the whole answer, and the BLS sends nothing of its own.
    asked.clear()
    client = pb_utils.incoming_request({"text_input": np.array([b"hi"], dtype=np.object_)}, OUTPUT_NAMES,
                                       model_name="multimodal_bls")
    once = request.model_copy(update={"stream": False})
    sent = serve_and_collect(client, responses, loop_thread,
                             lambda inputs, channel: model.start_decode(once, channel), "multimodal_bls")
    assert len(sent) == 2 and asked[0].first_token_sent is False
