"""The encoders' embedding cache (mmtriton.embedding_cache) through a real EncoderService: the tiny checkpoints'
real towers, the real media loader and the real NIXL pool (an EmbeddingReceiver reads what was handed over).

A hit skips the tower and is bit-equal to a fresh encode; every hand-over still gets its own pool region that the
reader's ack frees; identical items in one batch are encoded once; the key is the decoded content × kind × the
encoder; the LRU stays within its bytes; 0 disables it. About 10 s (loading the two towers).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mmtriton.embedding_cache import DigestMemo, EmbeddingCache, content_digest, encoded_nbytes
from mmtriton.encoder_service import AudioMediaEncoder, EncodedMedia, EncoderService
from mmtriton.media.video import VideoOptions
from mmtriton.protocol import MediaItem
from mmtriton.settings import Settings
from mmtriton.testing import pattern_image, png_bytes, tone, video_bytes, wav_bytes
from mmtriton.transfer import EmbeddingDescriptor, EmbeddingReceiver
from mmtriton.wire import MediaPlacement, parse_placement

TAG = f"embcache-{os.getpid()}"
MiB = 1024 * 1024


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image(width: int, height: int, seed: int, where: str = "image_url[0]") -> MediaItem:
    return MediaItem("image", data_uri("image/png", png_bytes(pattern_image(width, height, seed))), where)


class CountingTower:
    """The real tower, recording how many items each forward pass got (what the cache must spare it)."""

    def __init__(self, tower) -> None:
        self.tower = tower
        self.kind, self.kinds = tower.kind, tower.kinds
        self.passes: list[int] = []

    async def load(self, media, item, video=None):
        return await self.tower.load(media, item, video)

    def encode_many(self, loaded: list) -> list[EncodedMedia]:
        self.passes.append(len(loaded))
        return self.tower.encode_many(loaded)


@pytest.fixture(scope="module")
def vision_tower(tiny_models):
    from mmtriton.encoder import Qwen2VLImageEncoder

    return Qwen2VLImageEncoder(str(tiny_models["qwen2-vl"]))


@pytest.fixture(scope="module")
def receiver():
    rcv = EmbeddingReceiver(f"{TAG}-rcv", 16 * MiB)
    yield rcv
    rcv.close()


def make_service(tiny_models, tower, name: str, cache_mib: int = 64, kind: str = "image",
                 model: str = "qwen2-vl") -> tuple[EncoderService, CountingTower]:
    counting = CountingTower(tower)
    settings = Settings(model=str(tiny_models[model]), embedding_pool_mib=8, embedding_ack_timeout_s=30,
                        embedding_cache_mib=cache_mib)
    return EncoderService(kind, settings, counting, agent_name=f"{TAG}-{name}"), counting


def encode(service: EncoderService, *requests: list[MediaItem],
           video: list[VideoOptions | None] | None = None) -> list[list[EmbeddingDescriptor]]:
    results = asyncio.run(service.encode_batch(list(requests), video))
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return [[EmbeddingDescriptor.from_json(raw) for raw in r] for r in results]


def drained(service: EncoderService, receiver: EmbeddingReceiver, within_s: float = 10.0) -> bool:
    """The pool is empty again: every region handed out was acked (acks arrive on the sender's poll thread).

    The receiver's ack is a UCX active message that may stay queued until its agent's worker is progressed again
    (in llm_prefill: by its next fetch); nothing else calls this receiver, so progress it here."""
    deadline = time.monotonic() + within_s
    while service.pool_stats()["bytes_in_use"] and time.monotonic() < deadline:
        with receiver._nixl_lock:
            receiver._agent.get_new_notifs()
        time.sleep(0.01)
    return service.pool_stats()["bytes_in_use"] == 0


def fetch(receiver: EmbeddingReceiver, descriptors: list[EmbeddingDescriptor]) -> list[torch.Tensor]:
    return [receiver.fetch(d, timeout_s=10) for d in descriptors]


def test_a_hit_skips_the_tower_and_equals_a_fresh_encode(tiny_models, vision_tower, receiver):
    service, tower = make_service(tiny_models, vision_tower, "hit")
    img = pattern_image(100, 80, seed=1)
    try:
        [[first]] = encode(service, [image(100, 80, 1)])
        assert service.pool_stats()["bytes_in_use"] > 0
        [got_first] = fetch(receiver, [first])  # read and acked: the region is free again
        assert drained(service, receiver)
        [[second]] = encode(service, [image(100, 80, 1, where="messages[0].content[0]")])

        assert tower.passes == [1], "the second request must not run the tower"
        assert service.embedding_cache.stats() | {"bytes": 0} == {
            "hits": 1, "misses": 1, "bytes": 0, "entries": 1, "evictions": 0}
        # A fresh region of its own, with the same placement, holding exactly what a fresh encode gives.
        assert second.transfer_id != first.transfer_id
        want = vision_tower.encode_many([img])[0]
        assert parse_placement(second.extra, "e") == MediaPlacement(kind="image", grid_thw=want.grid_thw)
        [got_second] = fetch(receiver, [second])
        assert torch.equal(got_second, want.embeddings) and torch.equal(got_first, want.embeddings)
        assert drained(service, receiver) and service.pool_stats()["acks"] == 2
        # What is cached is a compact CPU copy, counted by its bytes.
        assert service.embedding_cache.stats()["bytes"] == encoded_nbytes(want)
    finally:
        service.close()


def test_identical_items_in_one_batch_are_encoded_once_each_in_its_own_region(tiny_models, vision_tower, receiver):
    service, tower = make_service(tiny_models, vision_tower, "batch")
    a, b = pattern_image(100, 80, seed=1), pattern_image(60, 90, seed=2)
    try:
        # Two requests of one dynamic batch: A twice in the first, A and B in the second.
        first, second = encode(service, [image(100, 80, 1, "m[0].c[0]"), image(100, 80, 1, "m[0].c[1]")],
                               [image(60, 90, 2, "image_url[0]"), image(100, 80, 1, "image_url[1]")])
        assert tower.passes == [2], "one pass, A and B once each"
        assert service.embedding_cache.stats()["hits"] == 2 and service.embedding_cache.stats()["misses"] == 2
        handed = [*first, *second]
        assert len({d.transfer_id for d in handed}) == 4 and len({d.addr for d in handed}) == 4
        want_a, want_b = vision_tower.encode_many([a, b])
        assert [parse_placement(d.extra, "e").grid_thw for d in handed] == [
            want_a.grid_thw, want_a.grid_thw, want_b.grid_thw, want_a.grid_thw]
        got = fetch(receiver, handed)
        for tensor, want in zip(got, [want_a, want_a, want_b, want_a], strict=True):
            assert torch.equal(tensor, want.embeddings)
        assert drained(service, receiver)

        # A prompt mixing a cached item between new ones: each descriptor in its item's place.
        c = pattern_image(40, 120, seed=3)
        [mixed] = encode(service, [image(40, 120, 3, "m[0].c[0]"), image(60, 90, 2, "m[0].c[1]"),
                                   image(100, 80, 1, "m[0].c[2]")])
        assert tower.passes == [2, 1], "only the new item went through the tower"
        [want_c] = vision_tower.encode_many([c])
        assert [parse_placement(d.extra, "e").grid_thw for d in mixed] == [
            want_c.grid_thw, want_b.grid_thw, want_a.grid_thw]
        for tensor, want in zip(fetch(receiver, mixed), [want_c, want_b, want_a], strict=True):
            assert torch.equal(tensor, want.embeddings)
        assert service.batching == {"batches": 2, "requests": 3, "max_requests": 2}
    finally:
        service.close()


def test_the_key_is_the_decoded_content_not_the_url(tiny_models, vision_tower, receiver, tmp_path: Path):
    png = png_bytes(pattern_image(100, 80, seed=1))
    (tmp_path / "a.png").write_bytes(png)
    settings = Settings(model=str(tiny_models["qwen2-vl"]), embedding_pool_mib=8, allowed_local_media_dirs=(
        str(tmp_path),))
    tower = CountingTower(vision_tower)
    service = EncoderService("image", settings, tower, agent_name=f"{TAG}-key")
    try:
        encode(service, [MediaItem("image", data_uri("image/png", png), "image_url[0]")])
        [[from_file]] = encode(service, [MediaItem("image", f"file://{tmp_path / 'a.png'}", "image_url[0]")])
        assert tower.passes == [1], "the same pixels from a file are the same entry"
        # Other pixels of the same size are another entry.
        encode(service, [image(100, 80, 2)])
        assert tower.passes == [1, 1]
        fetch(receiver, [from_file])
    finally:
        service.close()
    # The scope (encoder, checkpoint, dtype) and the kind are part of the key.
    img = pattern_image(20, 20, seed=1)
    keys = {EmbeddingCache(MiB, scope).key(kind, img)
            for scope in ("encoder_image:/m:auto", "encoder_image:/m:float16") for kind in ("image", "video")}
    assert len(keys) == 4
    assert content_digest(img) != content_digest(pattern_image(20, 20, seed=2))
    assert content_digest(("not", "a", "media value")) is None  # unknown values are encoded, never cached


def test_a_video_is_keyed_by_the_frames_its_sampling_chose(tiny_models, vision_tower, receiver):
    service, tower = make_service(tiny_models, vision_tower, "video")
    clip = data_uri("video/mp4", video_bytes(64, 48, seconds=2.0, fps=10, seed=3))
    item = MediaItem("video", clip, "video_url[0]")
    four, two = VideoOptions(num_frames=4), VideoOptions(num_frames=2)
    try:
        [[d4]] = encode(service, [item], video=[four])
        [[d2]] = encode(service, [item], video=[two])
        [[again]] = encode(service, [item], video=[four])
        assert tower.passes == [1, 1], "other sampling, other frames: encoded; the same sampling again: cached"
        placements = [parse_placement(d.extra, "e") for d in (d4, d2, again)]
        assert [p.kind for p in placements] == ["video"] * 3
        assert placements[0] == placements[2] and placements[0] != placements[1]
        got4, _, got_again = fetch(receiver, [d4, d2, again])
        assert torch.equal(got4, got_again)
        assert drained(service, receiver)
    finally:
        service.close()


def test_the_lru_stays_within_its_bytes_and_evicts_the_least_recently_used(tiny_models, vision_tower, receiver):
    service, tower = make_service(tiny_models, vision_tower, "lru")
    a, b, c = (image(100, 80, 1), image(100, 80, 2), image(100, 80, 3))
    try:
        [[probe]] = encode(service, [a])
        entry = service.embedding_cache.stats()["bytes"]
        service.embedding_cache.lru.max_bytes = 2 * entry  # room for two same-sized entries
        handed = [probe]
        for request in ([b], [a], [c], [a], [b]):  # a is used again before c comes: b is the one evicted
            handed += [d for batch in encode(service, request) for d in batch]
        stats = service.embedding_cache.stats()
        assert tower.passes == [1, 1, 1, 1], "a, b, c, then b again after its eviction"
        assert stats["hits"] == 2 and stats["misses"] == 4 and stats["evictions"] == 2
        assert stats["entries"] == 2 and stats["bytes"] <= 2 * entry
        fetch(receiver, handed)
        assert drained(service, receiver)
    finally:
        service.close()


def test_zero_disables_the_cache(tiny_models, vision_tower, receiver):
    service, tower = make_service(tiny_models, vision_tower, "off", cache_mib=0)
    try:
        handed = [d for _ in range(2) for batch in encode(service, [image(100, 80, 1), image(100, 80, 1)])
                  for d in batch]
        assert tower.passes == [2, 2]
        assert service.embedding_cache.stats() == {"hits": 0, "misses": 0, "bytes": 0, "entries": 0, "evictions": 0}
        fetch(receiver, handed)
    finally:
        service.close()


def test_audio_hits_equal_a_fresh_encode(tiny_models, receiver):
    tower = AudioMediaEncoder(str(tiny_models["qwen2-audio"]), torch.float32)
    service, counting = make_service(tiny_models, tower, "audio", kind="audio", model="qwen2-audio")
    wave = tone(1.0, 16000)
    clip = MediaItem("audio", data_uri("audio/wav", wav_bytes(wave, 16000)), "audio_url[0]")
    try:
        [[first]] = encode(service, [clip])
        [[second]] = encode(service, [clip])
        assert counting.passes == [1]
        loaded = asyncio.run(service.media.load_audio(clip, tower.tower.sample_rate))
        want = tower.encode_many([np.asarray(loaded)])[0].embeddings
        got_first, got_second = fetch(receiver, [first, second])
        assert torch.equal(got_second, want) and torch.equal(got_first, want)
        assert parse_placement(second.extra, "e") == MediaPlacement(kind="audio")
        assert drained(service, receiver)
    finally:
        service.close()


def test_digests_are_remembered_per_object_and_forgotten_with_it(monkeypatch):
    """The decoded-media cache hands a repeated item's same object to every request: its pixels are hashed
    once. A different object with the same pixels gets the same digest (hashed anew); a collected one is
    forgotten, so a new object at a reused address is hashed, not taken for the old one."""
    import gc

    import mmtriton.embedding_cache as embedding_cache

    hashed: list[int] = []
    real = embedding_cache.content_digest
    monkeypatch.setattr(embedding_cache, "content_digest", lambda loaded: hashed.append(id(loaded)) or real(loaded))
    memo = DigestMemo(max_entries=2)
    image = pattern_image(64, 48, seed=3)
    assert memo.digest(image) == memo.digest(image) == real(image)
    assert len(hashed) == 1
    twin = pattern_image(64, 48, seed=3)
    assert memo.digest(twin) == real(image) and len(hashed) == 2
    del twin
    gc.collect()
    assert len(memo) == 1  # only image's entry is left
    other = pattern_image(64, 48, seed=4)
    assert memo.digest(other) != memo.digest(image)
    samples = np.zeros(3)
    memo.digest(samples)
    assert len(memo) == 2  # bounded: the oldest (image) went, and is hashed again
    count = len(hashed)
    memo.digest(image)
    assert len(hashed) == count + 1
    assert memo.digest(object()) is None  # not a media value: never cached
