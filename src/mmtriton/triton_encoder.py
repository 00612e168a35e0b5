"""The encoder models' Triton adapter (``encoder_image``, ``encoder_audio``): one class, the modality a parameter.

Each encoder takes ``<kind>_url`` / ``<kind>_label`` for every media kind it serves (encoder_image: image and
video) and an optional ``media_options`` (the request's ``media_io_kwargs`` JSON: how videos are sampled).
Triton's dynamic batching hands ``execute`` several requests; their items go through the tower in one forward
pass (:meth:`EncoderService.encode_batch`), and a request whose item fails gets its own error.
"""

from __future__ import annotations

import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils

from mmtriton import triton_io
from mmtriton.encoder_service import SERVED_KINDS, EncoderService, media_encoder_for
from mmtriton.engine import resolve_dtype
from mmtriton.protocol import InvalidInput, MediaIOKwargs, MediaItem, VideoOptions, input_string, input_strings

MEDIA_OPTIONS = "media_options"


def input_names(encoder: str) -> list[str]:
    """The encoder model's inputs: url and label per media kind it serves, then media_options."""
    return [f"{k}_{part}" for k in SERVED_KINDS[encoder] for part in ("url", "label")] + [MEDIA_OPTIONS]


def request_items(request, encoder: str) -> tuple[list[MediaItem], VideoOptions | None] | Exception:
    """A request's items (each served kind's ``<kind>_url``, named as the client named them (``<kind>_label``)
    or by index; kinds in SERVED_KINDS order) and its video sampling options."""
    try:
        inputs = triton_io.read_inputs(request, input_names(encoder))
        items: list[MediaItem] = []
        for kind in SERVED_KINDS[encoder]:
            urls = input_strings(inputs.get(f"{kind}_url"), f"{kind}_url")
            labels = input_strings(inputs.get(f"{kind}_label"), f"{kind}_label")
            if len(labels) != len(urls):
                labels = [f"{kind}_url[{i}]" for i in range(len(urls))]
            items += [MediaItem(kind, u, label) for u, label in zip(urls, labels, strict=True)]
        return items, parse_media_options(input_string(inputs.get(MEDIA_OPTIONS), MEDIA_OPTIONS))
    except Exception as exc:  # noqa: BLE001 - answered as this request's error
        return exc


def parse_media_options(raw: str | None) -> VideoOptions | None:
    """``media_options``: MediaIOKwargs JSON (validated again here: the encoders are reachable directly)."""
    if raw is None or not raw.strip():
        return None
    try:
        return MediaIOKwargs.model_validate_json(raw).video
    except ValueError as exc:
        raise InvalidInput(f"{MEDIA_OPTIONS}: not valid media_io_kwargs ({str(exc).splitlines()[0]})") from exc


def descriptors_response(descriptors: list[str]):
    # [1, items]: this request's row of the batch.
    out = np.array([[d.encode() for d in descriptors]], dtype=np.object_).reshape(1, len(descriptors))
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("embeddings", out)])


class EncoderModel:
    """Subclassed by each encoder's model.py, which sets KIND."""

    KIND = ""

    def initialize(self, args):
        import torch

        self.model_name = args["model_name"]
        settings = triton_io.load_settings(args)
        dtype = getattr(torch, resolve_dtype(settings), torch.float32)
        self.service = EncoderService(self.KIND, settings, media_encoder_for(self.KIND, settings.model_path(), dtype),
                                      agent_name=None)
        # One loop for this instance: the media loader's HTTP session lives on it.
        self.loop = asyncio.new_event_loop()
        service = self.service
        self.metrics = triton_io.GaugeExporter(self.model_name, {
            "mmtriton_media_cache": ("Decoded-media cache of the encoder (hits, misses, evictions, bytes, items)",
                                     service.media.stats),
            "mmtriton_embedding_cache": ("Embedding cache of the encoder (hits: items answered without the tower, "
                                         "misses, bytes, entries, evictions)", service.embedding_cache.stats),
            "mmtriton_embedding_pool": ("Embedding pool occupancy and transfer counters of the encoder",
                                        service.pool_stats),
            "mmtriton_encoder_batching": ("Forward passes of the tower, the requests they served, the most in one",
                                          lambda: dict(service.batching)),
            **triton_io.stage_time_sources(service.times),
        })
        pb_utils.Logger.log_info(f"{self.model_name}: tower {service.tower_name} ready")

    def execute(self, requests):
        batch = [request_items(request, self.KIND) for request in requests]
        valid = [read for read in batch if not isinstance(read, Exception)]
        encoded = iter(self.loop.run_until_complete(self.service.encode_batch(
            [items for items, _ in valid], [video for _, video in valid])) if valid else [])
        responses = []
        for read in batch:
            result = read if isinstance(read, Exception) else next(encoded)
            if isinstance(result, BaseException):
                responses.append(triton_io.error_response(result))
            else:
                responses.append(descriptors_response(result))
        return responses

    def finalize(self):
        self.metrics.stop()
        self.loop.run_until_complete(self.service.media.close())
        self.service.close()
        self.loop.close()
