"""multimodal_agg's Triton side: request tensors → mmtriton.protocol → AggregatedPipeline → VllmEngine → responses."""

from __future__ import annotations

import uuid

import triton_python_backend_utils as pb_utils

from mmtriton import triton_io
from mmtriton.engine import VllmEngine, engine_args_for, to_vllm_sampling
from mmtriton.pipeline import AggregatedPipeline
from mmtriton.protocol import INPUTS, parse_request

INPUT_NAMES = [i["name"] for i in INPUTS]


class AggModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        self.settings = triton_io.load_settings(args)
        self.pipeline = AggregatedPipeline(self.settings)
        self.logger.log_info(
            f"multimodal_agg: model {self.pipeline.model_path} (family {self.pipeline.family.name}), starting vLLM"
        )
        self.engine = VllmEngine(
            engine_args_for(self.settings, self.pipeline.limit_mm_per_prompt()),
            env={"VLLM_CPU_KVCACHE_SPACE": str(self.settings.kv_cache_gib)},
            on_death=self.settings.engine_on_death,
        )
        self.engine.start(self.settings.engine_start_timeout_s)
        self.responses = triton_io.ResponseThread(self.logger)
        self.engine.before_exit.append(self.responses.drain)
        self.metrics = triton_io.GaugeExporter("multimodal_agg", triton_io.engine_sources(self.engine))
        self.logger.log_info("multimodal_agg: ready")

    def execute(self, requests):
        triton_io.dispatch(requests, self.responses, INPUT_NAMES, self.engine.submit, self.serve, "multimodal_agg")
        return None

    async def serve(self, inputs, channel):
        req = parse_request(inputs, self.settings)
        with self.engine.times.time("preprocess"):
            prompt = await self.pipeline.prepare(req)
        request_id = uuid.uuid4().hex
        final = await self.engine.generate(
            request_id=request_id, prompt=prompt, sampling_params=to_vllm_sampling(req.sampling), stream=req.stream,
            emit=channel.emit, cancelled=channel.is_cancelled,
        )
        if final is None:
            self.logger.log_info(f"multimodal_agg: request {request_id} cancelled by the client; aborted in vLLM")
            channel.finish_cancelled()

    def finalize(self):
        self.logger.log_info("multimodal_agg: shutting down")
        try:
            self.engine.submit(self.pipeline.media.close()).result(timeout=5)
        except Exception as exc:  # shutting down anyway
            self.logger.log_warn(f"multimodal_agg: closing the media client failed: {exc}")
        self.metrics.stop()
        self.engine.shutdown()
        self.responses.stop()
