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


def _items(request) -> list[MediaItem] | Exception:
    try:
        inputs = triton_io.read_inputs(request, ["image_url", "image_label"])
        urls = input_strings(inputs["image_url"], "image_url")
        labels = input_strings(inputs["image_label"], "image_label")
        if len(labels) != len(urls):
            labels = [f"image_url[{i}]" for i in range(len(urls))]
        return [MediaItem("image", u, label) for u, label in zip(urls, labels, strict=True)]
    except Exception as exc:  # noqa: BLE001 - answered as this request's error
        return exc


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
            "mmtriton_encoder_batching": ("Forward passes of the tower, the requests they served, the most in one",
                                          lambda: dict(self.service.batching)),
            **triton_io.stage_time_sources(self.service.times),
        })
        pb_utils.Logger.log_info(f"encoder_image: {type(self.service.encoder).__name__} ready")

    def execute(self, requests):
        # Triton's dynamic batch: every request's images go through the tower in one forward pass.
        batch = [_items(request) for request in requests]
        valid = [items for items in batch if not isinstance(items, Exception)]
        encoded = iter(self.loop.run_until_complete(self.service.encode_batch(valid)) if valid else [])
        responses = []
        for items in batch:
            result = items if isinstance(items, Exception) else next(encoded)
            if isinstance(result, BaseException):
                responses.append(triton_io.error_response(result))
                continue
            # [1, images]: this request's row of the batch.
            out = np.array([[d.encode() for d in result]], dtype=np.object_).reshape(1, len(result))
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("embeddings", out)]))
        return responses

    def finalize(self):
        self.metrics.stop()
        self.loop.run_until_complete(self.service.media.close())
        self.service.close()
        self.loop.close()
