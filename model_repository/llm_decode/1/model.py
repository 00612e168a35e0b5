"""llm_decode: decode request JSON → streamed tokens (public outputs); or a decode cancel from multimodal_bls.
Adapter over mmtriton.disagg.DecodeService."""

import triton_python_backend_utils as pb_utils

from mmtriton import triton_io
from mmtriton.disagg import DecodeService
from mmtriton.protocol import input_string
from mmtriton.wire import DecodeCancel, DecodeRequest, parse_stage


class TritonPythonModel:
    def initialize(self, args):
        self.settings = triton_io.load_settings(args)
        self.service = DecodeService(self.settings)
        self.service.engine.start(self.settings.engine_start_timeout_s)
        self.responses = triton_io.ResponseThread(pb_utils.Logger)
        self.service.engine.before_exit.append(self.responses.drain)
        self.metrics = triton_io.GaugeExporter("llm_decode", triton_io.engine_sources(self.service.engine))
        pb_utils.Logger.log_info("llm_decode: ready")

    def execute(self, requests):
        triton_io.dispatch(requests, self.responses, ["decode_request", "decode_cancel"], self.service.engine.submit,
                           self._serve, "llm_decode")
        return None

    async def _serve(self, inputs, channel):
        if (cancel := input_string(inputs["decode_cancel"], "decode_cancel")) is not None:
            self.service.cancel(parse_stage(DecodeCancel, cancel, "decode_cancel"))
            channel.finish_cancelled()  # the cancel call's own (empty, final) answer
            return
        raw = input_string(inputs["decode_request"], "decode_request")
        request = parse_stage(DecodeRequest, raw or "", "decode_request")
        final = await self.service.run(request, channel.emit, channel.is_cancelled, channel.request_id)
        if final is None:
            pb_utils.Logger.log_info("llm_decode: request cancelled by the client; aborted in vLLM")
            channel.finish_cancelled()

    def finalize(self):
        self.metrics.stop()
        self.service.engine.shutdown()
        self.responses.stop()
