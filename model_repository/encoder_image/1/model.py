"""encoder_image: image URLs → embeddings over NIXL (one JSON descriptor per image). Thin adapter over
mmtriton.disagg.ImageEncoderService."""

import locale

locale.setlocale(locale.LC_ALL, "C.UTF-8")  # the stub starts ASCII; torch/transformers need UTF-8

import asyncio  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

_SRC = Path(__file__).resolve().parents[3] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from mmtriton import triton_io  # noqa: E402
from mmtriton.disagg import ImageEncoderService  # noqa: E402
from mmtriton.protocol import MediaItem, input_strings  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.settings = triton_io.load_settings(args)
        self.service = ImageEncoderService(self.settings)
        # One loop for this instance: the media loader's HTTP session lives on it.
        self.loop = asyncio.new_event_loop()
        sender = self.service.sender
        self.metrics = triton_io.GaugeExporter("encoder_image", {
            "mmtriton_media_cache": ("Decoded-image cache of the encoder (hits, misses, evictions, bytes, items)",
                                     self.service.media.stats),
            "mmtriton_embedding_pool": ("Embedding pool occupancy and transfer counters of the encoder",
                                        lambda: {**asdict(sender.occupancy()), **asdict(sender.stats())}),
            **triton_io.stage_time_sources(self.service.times),
        })
        pb_utils.Logger.log_info(f"encoder_image: {type(self.service.encoder).__name__} ready")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                urls = input_strings(triton_io.read_inputs(request, ["image_url"])["image_url"], "image_url")
                items = [MediaItem("image", u, f"image_url[{i}]") for i, u in enumerate(urls)]
                descriptors = self.loop.run_until_complete(self.service.encode(items))
                out = pb_utils.Tensor("embeddings", np.array([d.encode() for d in descriptors], dtype=np.object_))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except Exception as exc:
                responses.append(triton_io.error_response(exc))
        return responses

    def finalize(self):
        self.metrics.stop()
        self.loop.run_until_complete(self.service.media.close())
        self.service.close()
        self.loop.close()
