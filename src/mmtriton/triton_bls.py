"""multimodal_bls's Triton side: the Orchestrator's stage calls as BLS requests, llm_decode's responses forwarded.

The orchestration itself is plain Python (mmtriton.disagg.Orchestrator); this module turns its calls into
``pb_utils.InferenceRequest``s and carries errors back with their class (Triton 2.51 loses the code through BLS:
mmtriton.protocol.error_class recovers it from the text).
"""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from mmtriton import triton_io
from mmtriton.disagg import Orchestrator, first_token_head
from mmtriton.encoder_service import SERVED_KINDS
from mmtriton.engine import EngineDead
from mmtriton.lifetime import ReleaseLater
from mmtriton.protocol import INPUTS, OUTPUTS, InvalidInput, MediaIOKwargs, MediaItem, error_class, parse_request
from mmtriton.wire import DecodeCancel, DecodeRequest, PrefillRequest, PrefillResult, parse_stage

INPUT_NAMES = [i["name"] for i in INPUTS]


def string_tensor(name: str, values: list[str], batched: bool = False):
    array = np.array([v.encode() for v in values], dtype=np.object_)
    return pb_utils.Tensor(name, array.reshape(1, -1) if batched else array)


def raise_for(response, stage: str) -> None:
    """A stage's error response, or an in-band one (triton_io.IN_BAND_ERRORS) → our exception of the same class
    (client error, unavailable, internal)."""
    if response.has_error():
        error = response.error()
        text, code = error.message(), error.code()
    elif (text := triton_io.in_band_error(response)) is not None:
        code = pb_utils.TritonError.INTERNAL  # the class travels in the text's prefix, as through BLS anyway
    else:
        return
    kind, message = error_class(text)
    if kind == "invalid_input" or code == pb_utils.TritonError.INVALID_ARG:
        raise InvalidInput(message)
    if kind == "unavailable" or code == pb_utils.TritonError.UNAVAILABLE:
        raise EngineDead(f"{stage}: {message}")
    raise RuntimeError(f"{stage}: {message or 'failed without a message'}")


def forward(responses, channel: triton_io.ResponseChannel) -> bool:
    """llm_decode's responses to the client, each the moment it comes (the first token, which llm_decode sends
    before any KV moves, must not wait for the second); the one that ends the answer (it names a finish
    reason) carries the FINAL flag. False when the client cancelled (llm_decode is still generating then: the
    caller tells it to stop)."""
    sent = False
    for response in responses:
        raise_for(response, "llm_decode")
        if channel.is_cancelled():
            if hasattr(responses, "cancel"):
                responses.cancel()
            channel.finish_cancelled()
            return False
        if not response.output_tensors() or channel.closed:
            continue  # llm_decode's empty final-flag response, or anything after the final (none expected)
        out = pb_utils.InferenceResponse(output_tensors=response.output_tensors())
        if triton_io.finish_reason_of(response):
            channel.send_final(out)
        else:
            channel.send(out)
        sent = True
    if not sent:
        raise RuntimeError("llm_decode sent no output")
    channel.finish()  # ends the stream if no response named a finish reason (a no-op after send_final)
    return True


class BlsModel:
    """multimodal_bls: the public contract served by the encoders → llm_prefill → llm_decode through BLS."""

    def initialize(self, args):
        self.settings = triton_io.load_settings(args)
        self.timeout_us = int(self.settings.stage_timeout_s * 1e6)
        self.responses = triton_io.ResponseThread(pb_utils.Logger)
        self.loop = triton_io.EventLoopThread("multimodal_bls-loop")
        self.orchestrator = Orchestrator(self.settings, self.encode, self.prefill)
        # Finished decoupled BLS iterators stay referenced here until the stub's own cleanup thread has let go
        # of them (see mmtriton.lifetime.ReleaseLater).
        self.released_late = ReleaseLater(delay_s=10.0)

    def execute(self, requests):
        triton_io.dispatch(requests, self.responses, INPUT_NAMES, self.loop.submit, self.serve, "multimodal_bls")
        return None

    async def serve(self, inputs, channel):
        await self.orchestrator.run(
            parse_request(inputs, self.settings),
            decode=lambda decode_request: self.start_decode(decode_request, channel),
        )

    async def start_decode(self, decode_request: DecodeRequest, channel: triton_io.ResponseChannel) -> None:
        """Prefill's first token goes to the client from here, at once (not through llm_decode's answer: a hop
        less before the client's first token); then llm_decode goes on from it."""
        if (head := first_token_head(decode_request)) is not None:
            channel.emit(head)
            decode_request = decode_request.model_copy(update={"first_token_sent": True})
        await asyncio.to_thread(self.decode, decode_request, channel)

    async def encode(self, encoder: str, items: list[MediaItem], options: MediaIOKwargs | None) -> list[str]:
        """encoder_<encoder>'s descriptors for ``items`` (prompt order), in that order: the encoder answers each
        kind's inputs in SERVED_KINDS order, so its answer is put back in the items' order."""
        stage = f"encoder_{encoder}"
        inputs = []
        for kind in SERVED_KINDS[encoder]:
            mine = [i for i in items if i.kind == kind]
            if mine:  # [1, items]: the encoders batch requests
                inputs += [string_tensor(f"{kind}_url", [i.url for i in mine], batched=True),
                           string_tensor(f"{kind}_label", [i.where for i in mine], batched=True)]
        if options is not None and any(i.kind == "video" for i in items):  # what decides how videos are sampled
            inputs.append(string_tensor("media_options", [options.model_dump_json(exclude_none=True)], batched=True))
        request = pb_utils.InferenceRequest(model_name=stage, inputs=inputs, requested_output_names=["embeddings"],
                                            timeout=self.timeout_us)
        response = await request.async_exec()
        raise_for(response, stage)
        raw = pb_utils.get_output_tensor_by_name(response, "embeddings").as_numpy().reshape(-1)
        if len(raw) != len(items):
            raise RuntimeError(f"{stage} answered {len(raw)} descriptors for {len(items)} items")
        answered = iter(r.decode() if isinstance(r, bytes) else str(r) for r in raw)
        by_kind = {kind: [next(answered) for i in items if i.kind == kind] for kind in SERVED_KINDS[encoder]}
        return [by_kind[i.kind].pop(0) for i in items]

    async def prefill(self, prefill_request: PrefillRequest) -> PrefillResult:
        request = pb_utils.InferenceRequest(
            model_name="llm_prefill", inputs=[string_tensor("prefill_request", [prefill_request.model_dump_json()])],
            requested_output_names=["prefill_result"], timeout=self.timeout_us,
        )
        # llm_prefill is not decoupled on purpose: a plain BLS response is only ever freed by Python, while a
        # decoupled one can be freed by the stub's C++ cleanup thread without the GIL (see ReleaseLater).
        response = await request.async_exec()
        raise_for(response, "llm_prefill")
        tensor = pb_utils.get_output_tensor_by_name(response, "prefill_result")
        if tensor is None:
            raise RuntimeError("llm_prefill answered without a result")
        return parse_stage(PrefillResult, tensor.as_numpy().reshape(-1)[0], "prefill_result")

    def decode(self, decode_request: DecodeRequest, channel: triton_io.ResponseChannel) -> None:
        """Forward llm_decode's responses as they come (blocking iterator: runs in a worker thread)."""
        decode_request = decode_request.model_copy(update={"request_id": uuid.uuid4().hex})
        request = pb_utils.InferenceRequest(
            model_name="llm_decode", inputs=[string_tensor("decode_request", [decode_request.model_dump_json()])],
            requested_output_names=[o["name"] for o in OUTPUTS], timeout=self.timeout_us,
            # On 2.51 an error response after the first never reaches this iterator (an engine dying mid-answer
            # hung the client for good): llm_decode sends its failures as a normal final response instead.
            parameters={triton_io.IN_BAND_ERRORS: True},
        )
        responses = request.exec(decoupled=True)
        try:
            answered = forward(responses, channel)
        finally:
            self.released_late.hold(responses)
        if not answered:
            self.cancel_decode(decode_request.request_id)

    def cancel_decode(self, request_id: str) -> None:
        """Tell llm_decode to stop ``request_id`` (Triton 2.51's BLS has no cancel for a request it made: without
        this the engine generated every cancelled answer to its end)."""
        request = pb_utils.InferenceRequest(
            model_name="llm_decode", inputs=[string_tensor("decode_cancel", [DecodeCancel(
                request_id=request_id).model_dump_json()])],
            requested_output_names=[o["name"] for o in OUTPUTS], timeout=self.timeout_us,
        )
        responses = request.exec(decoupled=True)
        try:
            for response in responses:
                raise_for(response, "llm_decode (cancel)")
        finally:
            self.released_late.hold(responses)

    def finalize(self):
        self.loop.stop()
        self.responses.stop()
