"""multimodal_agg: one vLLM engine doing encode + prefill + decode (the baseline for correctness and speed).
Thin adapter: mmtriton.triton_agg.AggModel."""

from mmtriton import triton_io
from mmtriton.protocol import INPUTS, OUTPUTS
from mmtriton.triton_agg import AggModel


class TritonPythonModel(AggModel):
    @staticmethod
    def auto_complete_config(config):
        return triton_io.auto_complete(config, INPUTS, OUTPUTS, decoupled=True)
