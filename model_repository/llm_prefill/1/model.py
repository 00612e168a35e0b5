"""llm_prefill: prefill request JSON → signed prefill result JSON. Thin adapter over mmtriton.disagg.PrefillService."""

import locale

locale.setlocale(locale.LC_ALL, "C.UTF-8")  # the stub starts ASCII; vLLM/torch need UTF-8

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

_SRC = Path(__file__).resolve().parents[3] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from mmtriton import triton_io  # noqa: E402
from mmtriton.disagg import PrefillService, decode_request_for, parse_descriptor  # noqa: E402
from mmtriton.protocol import input_string, input_strings  # noqa: E402
from mmtriton.stages import PrefillRequest, parse_stage  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.settings = triton_io.load_settings(args)
        self.service = PrefillService(self.settings)
        self.service.engine.start(self.settings.engine_start_timeout_s)
        self.responses = triton_io.ResponseThread(pb_utils.Logger)
        self.metrics = triton_io.GaugeExporter("llm_prefill", triton_io.stage_time_sources(self.service.engine.times))
        pb_utils.Logger.log_info("llm_prefill: ready")

    def execute(self, requests):
        triton_io.dispatch(requests, self.responses, ["prefill_request", "embeddings"], self.service.engine.submit,
                           self._serve, "llm_prefill")
        return None

    async def _serve(self, inputs, channel):
        raw = input_string(inputs["prefill_request"], "prefill_request")
        request = parse_stage(PrefillRequest, raw or "", "prefill_request")
        request.embeddings += [parse_descriptor(e) for e in input_strings(inputs["embeddings"], "embeddings")]
        result = await self.service.run(request)
        outputs = [
            pb_utils.Tensor("prefill_result", np.array([result.model_dump_json().encode()], dtype=np.object_)),
            pb_utils.Tensor("decode_request", np.array(
                [decode_request_for(request, result).model_dump_json().encode()], dtype=np.object_)),
        ]
        channel.send_final(pb_utils.InferenceResponse(output_tensors=outputs))

    def finalize(self):
        self.metrics.stop()
        self.service.engine.shutdown()
        self.service.receiver.close()
        self.responses.stop()
