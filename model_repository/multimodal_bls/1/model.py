"""multimodal_bls: the public contract served by encoder_image / encoder_audio → llm_prefill → llm_decode through
BLS calls, routing by what the request holds. Thin adapter: mmtriton.triton_bls.BlsModel (the orchestration is
mmtriton.disagg.Orchestrator)."""

from mmtriton import triton_io
from mmtriton.protocol import INPUTS, OUTPUTS
from mmtriton.triton_bls import BlsModel


class TritonPythonModel(BlsModel):
    @staticmethod
    def auto_complete_config(config):
        return triton_io.auto_complete(config, INPUTS, OUTPUTS, decoupled=True)
