"""preprocess: the ensemble's first step. Public request → (image URLs in prompt order, prefill request JSON).
Thin adapter over mmtriton.disagg.RequestPlanner."""

import locale

locale.setlocale(locale.LC_ALL, "C.UTF-8")  # the stub starts ASCII; transformers needs UTF-8

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

_SRC = Path(__file__).resolve().parents[3] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from mmtriton import triton_io  # noqa: E402
from mmtriton.disagg import RequestPlanner  # noqa: E402
from mmtriton.protocol import INPUTS, parse_request  # noqa: E402

INPUT_NAMES = [i["name"] for i in INPUTS]


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config):
        outputs = []  # declared in config.pbtxt
        return triton_io.auto_complete(config, INPUTS, outputs, decoupled=False)

    def initialize(self, args):
        self.settings = triton_io.load_settings(args)
        self.planner = RequestPlanner(self.settings)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                prefill, images = self.planner.plan(parse_request(triton_io.read_inputs(request, INPUT_NAMES),
                                                                  self.settings))
                urls = np.array([i.url.encode() for i in images], dtype=np.object_).reshape(1, -1)
                labels = np.array([i.where.encode() for i in images], dtype=np.object_).reshape(1, -1)
                request_json = np.array([prefill.model_dump_json().encode()], dtype=np.object_)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("image_url", urls), pb_utils.Tensor("image_label", labels),
                    pb_utils.Tensor("prefill_request", request_json),
                ]))
            except Exception as exc:
                responses.append(triton_io.error_response(exc))
        return responses
