"""preprocess: the ensemble's first step. Public request → (media URLs and labels per media kind, each in prompt
order, for the encoder that serves it: image and video → encoder_image, audio → encoder_audio; the request's
media_io_kwargs JSON for encoder_image's video sampling; the prefill request JSON). Thin adapter over
mmtriton.disagg.RequestPlanner."""

import numpy as np
import triton_python_backend_utils as pb_utils

from mmtriton import triton_io
from mmtriton.disagg import ENCODED_KINDS, RequestPlanner, items_of
from mmtriton.encoder_service import SERVED_KINDS
from mmtriton.protocol import INPUTS, parse_request

INPUT_NAMES = [i["name"] for i in INPUTS]


def _row(values: list[str]) -> np.ndarray:
    # [1, items]: the encoders batch requests, so their inputs carry a batch dimension.
    return np.array([v.encode() for v in values], dtype=np.object_).reshape(1, -1)


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config):
        return triton_io.auto_complete(config, INPUTS, [], decoupled=False)  # outputs: config.pbtxt

    def initialize(self, args):
        self.settings = triton_io.load_settings(args)
        self.planner = RequestPlanner(self.settings)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                inputs = triton_io.read_inputs(request, INPUT_NAMES)
                prefill, media = self.planner.plan(parse_request(inputs, self.settings))
                outputs = [pb_utils.Tensor("prefill_request", np.array([prefill.model_dump_json().encode()],
                                                                       dtype=np.object_))]
                for kind in (k for encoder in ENCODED_KINDS for k in SERVED_KINDS[encoder]):
                    items = items_of(kind, media)
                    outputs += [pb_utils.Tensor(f"{kind}_url", _row([i.url for i in items])),
                                pb_utils.Tensor(f"{kind}_label", _row([i.where for i in items]))]
                options = prefill.sampling.media_io_kwargs
                outputs.append(pb_utils.Tensor("media_options", _row(
                    [options.model_dump_json(exclude_none=True) if options is not None else ""])))
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except Exception as exc:
                responses.append(triton_io.error_response(exc))
        return responses
