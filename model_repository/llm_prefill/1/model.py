"""llm_prefill: prefill request JSON (+ embedding descriptors from the encoders) → signed prefill result and the
decode request. Thin adapter over mmtriton.disagg.PrefillService."""

import numpy as np
import triton_python_backend_utils as pb_utils

from mmtriton import triton_io
from mmtriton.disagg import PrefillService, decode_request_for
from mmtriton.protocol import input_string, input_strings
from mmtriton.wire import PrefillRequest, parse_stage

DESCRIPTOR_INPUTS = ["embeddings", "audio_embeddings"]  # from encoder_image, encoder_audio (the ensemble)


def _string(value: str):
    return np.array([value.encode()], dtype=np.object_)


class TritonPythonModel:
    def initialize(self, args):
        self.settings = triton_io.load_settings(args)
        self.service = PrefillService(self.settings)
        self.service.engine.start(self.settings.engine_start_timeout_s)
        self.responses = triton_io.ResponseThread(pb_utils.Logger)
        self.service.engine.before_exit.append(self.responses.drain)
        self.metrics = triton_io.GaugeExporter("llm_prefill", triton_io.engine_sources(self.service.engine))
        pb_utils.Logger.log_info("llm_prefill: ready")

    def execute(self, requests):
        triton_io.dispatch(requests, self.responses, ["prefill_request", *DESCRIPTOR_INPUTS],
                           self.service.engine.submit, self._serve, "llm_prefill")
        return None

    async def _serve(self, inputs, channel):
        request = parse_stage(PrefillRequest, input_string(inputs["prefill_request"], "prefill_request") or "",
                              "prefill_request")
        for name in DESCRIPTOR_INPUTS:
            request.embeddings += input_strings(inputs[name], name)
        result = await self.service.run(request)
        channel.send_final(pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("prefill_result", _string(result.model_dump_json())),
            pb_utils.Tensor("decode_request", _string(decode_request_for(request, result).model_dump_json())),
        ]))

    def finalize(self):
        self.metrics.stop()
        self.service.engine.shutdown()
        self.service.receiver.close()
        self.responses.stop()
