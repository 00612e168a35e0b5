"""multimodal_bls: the public contract served by encoder_image → llm_prefill → llm_decode through BLS calls.

The orchestration is mmtriton.disagg.Orchestrator; this file only turns its three stage calls into Triton BLS
requests and forwards llm_decode's responses to the client.
"""

import locale

locale.setlocale(locale.LC_ALL, "C.UTF-8")  # the stub starts ASCII; transformers needs UTF-8

import asyncio  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

_SRC = Path(__file__).resolve().parents[3] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from mmtriton import triton_io  # noqa: E402
from mmtriton.disagg import Orchestrator  # noqa: E402
from mmtriton.engine import EngineDead  # noqa: E402
from mmtriton.lifetime import ReleaseLater  # noqa: E402
from mmtriton.protocol import INPUTS, OUTPUTS, InvalidInput, error_class, parse_request  # noqa: E402
from mmtriton.stages import PrefillResult, parse_stage  # noqa: E402

INPUT_NAMES = [i["name"] for i in INPUTS]


def _string_tensor(name, values, batched=False):
    array = np.array([v.encode() for v in values], dtype=np.object_)
    return pb_utils.Tensor(name, array.reshape(1, -1) if batched else array)


def _raise_for(response, stage):
    if response.has_error():
        error = response.error()
        kind, message = error_class(error.message())
        if kind == "invalid_input" or error.code() == pb_utils.TritonError.INVALID_ARG:
            raise InvalidInput(message)
        if kind == "unavailable":
            raise EngineDead(f"{stage}: {message}")
        raise RuntimeError(f"{stage}: {message}")


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config):
        return triton_io.auto_complete(config, INPUTS, OUTPUTS, decoupled=True)

    def initialize(self, args):
        self.settings = triton_io.load_settings(args)
        self.timeout_us = int(self.settings.stage_timeout_s * 1e6)
        self.responses = triton_io.ResponseThread(pb_utils.Logger)
        self.loop = triton_io.EventLoopThread("multimodal_bls-loop")
        self.orchestrator = Orchestrator(self.settings, self._encode, self._prefill)
        # Finished decoupled BLS iterators stay referenced here until the stub's own cleanup thread has let go
        # of them (see mmtriton.lifetime.ReleaseLater).
        self.released_late = ReleaseLater(delay_s=10.0)

    def execute(self, requests):
        triton_io.dispatch(requests, self.responses, INPUT_NAMES, self.loop.submit, self._serve, "multimodal_bls")
        return None

    async def _serve(self, inputs, channel):
        await self.orchestrator.run(
            parse_request(inputs, self.settings),
            decode=lambda decode_request: asyncio.to_thread(self._decode, decode_request, channel),
        )

    async def _encode(self, items):
        request = pb_utils.InferenceRequest(
            model_name="encoder_image",
            # [1, images]: encoder_image batches requests.
            inputs=[_string_tensor("image_url", [i.url for i in items], batched=True),
                    _string_tensor("image_label", [i.where for i in items], batched=True)],
            requested_output_names=["embeddings"], timeout=self.timeout_us,
        )
        response = await request.async_exec()
        _raise_for(response, "encoder_image")
        raw = pb_utils.get_output_tensor_by_name(response, "embeddings").as_numpy().reshape(-1)
        return [r.decode() if isinstance(r, bytes) else str(r) for r in raw]

    async def _prefill(self, prefill_request):
        request = pb_utils.InferenceRequest(
            model_name="llm_prefill", inputs=[_string_tensor("prefill_request", [prefill_request.model_dump_json()])],
            requested_output_names=["prefill_result"], timeout=self.timeout_us,
        )
        # llm_prefill is not decoupled on purpose: a plain BLS response is only ever freed by Python, while a
        # decoupled one can be freed by the stub's C++ cleanup thread without the GIL (see ReleaseLater).
        response = await request.async_exec()
        _raise_for(response, "llm_prefill")
        tensor = pb_utils.get_output_tensor_by_name(response, "prefill_result")
        if tensor is None:
            raise RuntimeError("llm_prefill answered without a result")
        return parse_stage(PrefillResult, tensor.as_numpy().reshape(-1)[0], "prefill_result")

    def _decode(self, decode_request, channel):
        """Forward llm_decode's responses as they come (blocking iterator: runs in a worker thread)."""
        request = pb_utils.InferenceRequest(
            model_name="llm_decode", inputs=[_string_tensor("decode_request", [decode_request.model_dump_json()])],
            requested_output_names=[o["name"] for o in OUTPUTS], timeout=self.timeout_us,
        )
        responses = request.exec(decoupled=True)
        try:
            self._forward(responses, channel)
        finally:
            self.released_late.hold(responses)

    @staticmethod
    def _forward(responses, channel):
        held = None  # one response held back, so the last one can carry the FINAL flag
        for response in responses:
            _raise_for(response, "llm_decode")
            if channel.is_cancelled():
                if hasattr(responses, "cancel"):
                    responses.cancel()
                channel.finish_cancelled()
                return
            if not response.output_tensors():
                continue  # the empty final-flag response
            if held is not None:
                channel.send(held)
            held = pb_utils.InferenceResponse(output_tensors=response.output_tensors())
        if held is None:
            raise RuntimeError("llm_decode sent no output")
        channel.send_final(held)

    def finalize(self):
        self.loop.stop()
        self.responses.stop()

