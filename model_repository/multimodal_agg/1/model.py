"""multimodal_agg: one vLLM engine doing encode + prefill + decode (the baseline for correctness and speed).

A thin adapter: request tensors → mmtriton.protocol → AggregatedPipeline → VllmEngine → responses.
"""

import locale

# The stub starts with an ASCII default encoding; vLLM/torch need UTF-8 before they are imported.
locale.setlocale(locale.LC_ALL, "C.UTF-8")

import sys  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

# The stub ignores PYTHONPATH: find the package in this checkout (an installed one works too).
_SRC = Path(__file__).resolve().parents[3] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import triton_python_backend_utils as pb_utils  # noqa: E402

from mmtriton import triton_io  # noqa: E402
from mmtriton.engine import VllmEngine, engine_args_for, to_vllm_sampling  # noqa: E402
from mmtriton.pipeline import AggregatedPipeline  # noqa: E402
from mmtriton.protocol import INPUTS, OUTPUTS, parse_request  # noqa: E402

INPUT_NAMES = [i["name"] for i in INPUTS]


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config):
        return triton_io.auto_complete(config, INPUTS, OUTPUTS, decoupled=True)

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
        )
        self.engine.start(self.settings.engine_start_timeout_s)
        self.responses = triton_io.ResponseThread(self.logger)
        self.cancelled = 0
        engine = self.engine
        self.metrics = triton_io.GaugeExporter("multimodal_agg", {
            "mmtriton_engine": ("vLLM engine state: alive (1/0), restarts after crashes, requests cancelled",
                                lambda: {"alive": float(engine.alive), "restarts": engine.restarts,
                                         "cancelled": self.cancelled}),
            **triton_io.stage_time_sources(engine.times),
        })
        self.logger.log_info("multimodal_agg: ready")

    def execute(self, requests):
        triton_io.dispatch(requests, self.responses, INPUT_NAMES, self.engine.submit, self._serve, "multimodal_agg")
        return None

    async def _serve(self, inputs, channel):
        req = parse_request(inputs, self.settings)
        with self.engine.times.time("preprocess"):
            engine_input = await self.pipeline.prepare(req)
        request_id = uuid.uuid4().hex
        final = await self.engine.generate(
            request_id=request_id,
            prompt=engine_input.prompt,
            sampling_params=to_vllm_sampling(req.sampling),
            stream=req.stream,
            emit=channel.emit,
            cancelled=channel.is_cancelled,
        )
        if final is None:
            self.cancelled += 1
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
