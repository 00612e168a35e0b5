"""The encoders' embedding cache on the live server: the same image twice through the ensemble (``multimodal``)
and the BLS path (``multimodal_bls``) is encoded once; the hit gives the same tokens, and every hand-over (hit or
not) is acked by prefill so the embedding pool drains. Uses the session's tritonserver; a few seconds on top."""

from __future__ import annotations

import base64
import time

import pytest

from client import RequestInputs, stream_grpc
from conftest import metric, pattern_image, png_bytes
from mmtriton.testing import assert_pool_drained

pytestmark = pytest.mark.integration
GREEDY = {"max_tokens": 16, "temperature": 0.0}
GAUGE_SETTLE_S = 1.2  # > GaugeExporter's refresh interval
ENCODER = "encoder_image"


def cache_count(server, item: str) -> float:
    return metric(server, "mmtriton_embedding_cache", item, ENCODER)


def tokens(server, model: str, uri: str) -> list[int]:
    inputs = RequestInputs(text_input="What is in the picture?", image_url=[uri], sampling_parameters=GREEDY,
                           stream=True)
    return [t for r in stream_grpc(server.config.grpc_url, model, inputs, timeout_s=180) for t in r["token_ids"]]


@pytest.mark.parametrize(("model", "seed"), [("multimodal", 1301), ("multimodal_bls", 1302)])
def test_the_same_image_twice_is_encoded_once(triton_server, model: str, seed: int):
    # An image no other test sends (its own size and seed): the first request must be a miss.
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(pattern_image(97, 61, seed=seed))).decode()
    time.sleep(GAUGE_SETTLE_S)  # let earlier requests' counts arrive
    hits, misses = cache_count(triton_server, "hits"), cache_count(triton_server, "misses")
    entries = cache_count(triton_server, "entries")
    expired = metric(triton_server, "mmtriton_embedding_pool", "expired", ENCODER)

    first = tokens(triton_server, model, uri)
    time.sleep(GAUGE_SETTLE_S)
    assert cache_count(triton_server, "misses") == misses + 1
    assert cache_count(triton_server, "hits") == hits
    assert cache_count(triton_server, "bytes") > 0

    second = tokens(triton_server, model, uri)
    time.sleep(GAUGE_SETTLE_S)
    assert second == first and len(first) > 0
    assert cache_count(triton_server, "hits") == hits + 1
    assert cache_count(triton_server, "misses") == misses + 1
    assert cache_count(triton_server, "entries") == entries + 1
    # The hit was copied into a region of its own, which prefill acked like any other.
    assert_pool_drained(triton_server, ENCODER, expired_before=expired)
