"""Fast unit tests of the disaggregated pipeline's stage code: no tritonserver, no vLLM engine.

What is faked is only what lies outside the code under test: vLLM's ``AsyncLLM`` (its outputs are vLLM's own
``RequestOutput`` / ``CompletionOutput``, its errors vLLM's own exceptions), the stage calls the Orchestrator makes,
an encoder tower, and Triton's ``triton_python_backend_utils`` (tests/fakes, installed as tests/test_triton_glue.py
does). The NIXL layer (``EmbeddingSender`` / ``EmbeddingReceiver``) is real. About 10 s, most of it importing vLLM.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fakes.install import install_fake_pb_utils

pb_utils = install_fake_pb_utils()

from vllm.config import KVTransferConfig  # noqa: E402
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError  # noqa: E402

from mmtriton import protocol, triton_bls, triton_io  # noqa: E402
from mmtriton.disagg import Orchestrator  # noqa: E402
from mmtriton.encoder_service import EncodedMedia, EncoderService  # noqa: E402
from mmtriton.engine import (  # noqa: E402
    EngineDead,
    GenerationChunk,
    RequestFailed,
    VllmEngine,
    fresh_engine_identity,
    generate_error,
)
from mmtriton.families import FAMILIES, Family, family_for  # noqa: E402
from mmtriton.media.loader import MediaLoader  # noqa: E402
from mmtriton.protocol import (  # noqa: E402
    GenerateRequest,
    InvalidInput,
    MediaIOKwargs,
    MediaItem,
    SamplingOptions,
    VideoOptions,
)
from mmtriton.settings import Settings  # noqa: E402
from mmtriton.transfer import EmbeddingDescriptor, EmbeddingReceiver  # noqa: E402
from mmtriton.wire import (  # noqa: E402
    DecodeRequest,
    MediaLayout,
    MediaPlacement,
    PrefillRequest,
    PrefillResult,
    parse_placement,
    parse_stage,
    sign,
    verify,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
OUTPUT_NAMES = [o["name"] for o in protocol.OUTPUTS]
TAG = f"stage-units-{os.getpid()}"
AUDIO_TOO_SHORT = "The audio (len=160) is too short for Qwen2-Audio's feature extractor"


def family(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


def caused_by(cause: BaseException | None) -> EngineGenerateError:
    """An EngineGenerateError as AsyncLLM.generate raises it: empty, the real error as its cause."""
    try:
        if cause is None:
            raise EngineGenerateError()
        raise EngineGenerateError() from cause
    except EngineGenerateError as exc:
        return exc


# --- engine.generate_error / fresh_engine_identity ------------------------------------------------------------------


def test_generate_error_from_a_processor_value_error_is_the_clients_input() -> None:
    error = generate_error(caused_by(ValueError(AUDIO_TOO_SHORT)))
    assert isinstance(error, InvalidInput) and str(error) == AUDIO_TOO_SHORT


def test_generate_error_from_anything_else_is_ours_and_names_the_cause() -> None:
    error = generate_error(caused_by(RuntimeError("KV load failed for block 7")))
    assert type(error) is RequestFailed
    assert "RuntimeError: KV load failed for block 7" in str(error)

    # An implicit cause (raised while handling another error) counts too.
    try:
        try:
            raise KeyError("req-1")
        except KeyError:
            raise EngineGenerateError()  # noqa: B904 - the implicit __context__ is what is tested
    except EngineGenerateError as implicit:
        assert "KeyError" in str(generate_error(implicit)) and "req-1" in str(generate_error(implicit))


def test_generate_error_without_a_cause_names_the_vllm_error() -> None:
    error = generate_error(caused_by(None))
    assert type(error) is RequestFailed and "EngineGenerateError" in str(error)


def nixl_kv_config() -> KVTransferConfig:
    return KVTransferConfig(kv_connector="NixlConnector", kv_role="kv_producer", kv_buffer_device="cpu")


def test_fresh_engine_identity_gives_a_new_kv_engine_id_and_leaves_the_original_alone() -> None:
    config = nixl_kv_config()
    original_id = config.engine_id
    args = {"model": "/m", "enable_mm_embeds": True, "kv_transfer_config": config}

    fresh = fresh_engine_identity(args)

    assert fresh["kv_transfer_config"].engine_id not in (None, original_id)
    assert fresh["kv_transfer_config"] is not config and config.engine_id == original_id
    assert args["kv_transfer_config"] is config
    assert fresh["kv_transfer_config"].kv_connector == "NixlConnector"
    assert fresh["kv_transfer_config"].kv_role == "kv_producer"
    assert {k: v for k, v in fresh.items() if k != "kv_transfer_config"} == {"model": "/m", "enable_mm_embeds": True}
    # Every restart is a new identity, not one fixed second id.
    assert fresh_engine_identity(args)["kv_transfer_config"].engine_id != fresh["kv_transfer_config"].engine_id


def test_fresh_engine_identity_without_a_kv_config_changes_nothing() -> None:
    args = {"model": "/m", "max_model_len": 128}
    assert fresh_engine_identity(args) == {"model": "/m", "max_model_len": 128}


# --- VllmEngine.generate against a stand-in AsyncLLM ----------------------------------------------------------------


def step(token_ids: list[int], text: str, finished: bool = False, finish_reason: str | None = None,
         kv_transfer_params: dict[str, Any] | None = None) -> RequestOutput:
    """One DELTA output, built with vLLM's own output classes."""
    completion = CompletionOutput(index=0, text=text, token_ids=token_ids, cumulative_logprob=None, logprobs=None,
                                  finish_reason=finish_reason)
    return RequestOutput(request_id="r", prompt=None, prompt_token_ids=[7, 8, 9], prompt_logprobs=None,
                         outputs=[completion], finished=finished, kv_transfer_params=kv_transfer_params)


class FakeAsyncLLM:
    """What VllmEngine uses of vllm.v1.engine.async_llm.AsyncLLM: generate (an async generator), abort, errored."""

    def __init__(self, outputs: Iterable[RequestOutput] = (), error: BaseException | None = None,
                 die_on_error: bool = False):
        self.outputs = list(outputs)
        self.error = error
        self.die_on_error = die_on_error  # the engine is found errored when the error comes out
        self.errored = False
        self.aborted: list[str] = []
        self.requests: list[tuple[Any, Any, str]] = []

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str) -> AsyncIterator[RequestOutput]:
        self.requests.append((prompt, sampling_params, request_id))
        for out in self.outputs:
            await asyncio.sleep(0)
            yield out
        if self.error is not None:
            self.errored = self.die_on_error
            raise self.error

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def engine_with(llm: FakeAsyncLLM) -> VllmEngine:
    """A VllmEngine whose AsyncLLM is ``llm``, looking started (``alive`` asks for a live engine thread)."""
    engine = VllmEngine({"model": "/unused"})
    engine.llm = llm
    engine._thread = threading.current_thread()
    engine.loop = asyncio.new_event_loop()
    return engine


def run_generate(engine: VllmEngine, stream: bool, cancelled=lambda: False) -> tuple[GenerationChunk | None,
                                                                                     list[GenerationChunk]]:
    emitted: list[GenerationChunk] = []
    try:
        final = engine.loop.run_until_complete(
            engine.generate("req-1", {"prompt": "hi"}, None, stream, emitted.append, cancelled))
    finally:
        engine.loop.close()
    return final, emitted


NORMAL_RUN = [step([11], "a"), step([12], "b"), step([13], "c", finished=True, finish_reason="length",
                                                       kv_transfer_params={"remote_engine_id": "p0"})]


def test_a_streamed_run_emits_each_step_and_the_last_one_ends_it() -> None:
    llm = FakeAsyncLLM(NORMAL_RUN)
    engine = engine_with(llm)
    assert engine.alive

    final, emitted = run_generate(engine, stream=True)

    assert [(c.text, c.token_ids, c.finish_reason, c.finished) for c in emitted] == [
        ("a", [11], "", False), ("b", [12], "", False), ("c", [13], "length", True)]
    assert [c.num_output_tokens for c in emitted] == [1, 2, 3]
    assert all(c.num_input_tokens == 3 for c in emitted)
    assert final is emitted[-1] and final.extra == {"kv_transfer_params": {"remote_engine_id": "p0"}}
    assert llm.requests == [({"prompt": "hi"}, None, "req-1")] and llm.aborted == []
    assert engine.times.counts() == {"first_token": 1.0, "decode": 2.0}


def test_a_non_streamed_run_emits_one_chunk_with_everything() -> None:
    final, emitted = run_generate(engine_with(FakeAsyncLLM(NORMAL_RUN)), stream=False)

    assert len(emitted) == 1 and emitted[0] is final
    assert (final.text, final.token_ids, final.finish_reason, final.num_output_tokens) == ("abc", [11, 12, 13],
                                                                                           "length", 3)


@pytest.mark.parametrize("reason", ["error", "abort"])
def test_a_failed_finish_reason_raises_instead_of_answering(reason: str) -> None:
    # What decode sees when the KV load from prefill failed: a final output, no tokens, finish_reason "error".
    llm = FakeAsyncLLM([step([], "", finished=True, finish_reason=reason)])

    with pytest.raises(RequestFailed, match=f"finish_reason '{reason}' after 0 token"):
        run_generate(engine_with(llm), stream=True)


def test_a_failed_finish_reason_from_a_dead_engine_is_engine_dead() -> None:
    llm = FakeAsyncLLM([step([5], "x"), step([], "", finished=True, finish_reason="error")])
    engine = engine_with(llm)
    original = llm.generate

    async def dies_before_the_end(*args: Any) -> AsyncIterator[RequestOutput]:
        async for out in original(*args):
            llm.errored = out.finished or llm.errored
            yield out

    llm.generate = dies_before_the_end
    with pytest.raises(EngineDead, match="went down"):
        run_generate(engine, stream=True)


def test_a_request_to_an_engine_that_is_not_alive_is_engine_dead() -> None:
    llm = FakeAsyncLLM(NORMAL_RUN)
    llm.errored = True
    with pytest.raises(EngineDead):
        run_generate(engine_with(llm), stream=True)
    assert llm.requests == []  # never reached vLLM

    restarting = engine_with(FakeAsyncLLM(NORMAL_RUN))
    restarting.restarting = True
    with pytest.raises(EngineDead):
        run_generate(restarting, stream=True)


def test_an_engine_generate_error_from_a_value_error_is_invalid_input() -> None:
    llm = FakeAsyncLLM(error=caused_by(ValueError(AUDIO_TOO_SHORT)))
    with pytest.raises(InvalidInput, match=r"The audio \(len=160\) is too short"):
        run_generate(engine_with(llm), stream=True)


def test_an_engine_generate_error_from_a_dying_engine_is_engine_dead() -> None:
    llm = FakeAsyncLLM(error=caused_by(RuntimeError("engine core gone")), die_on_error=True)
    with pytest.raises(EngineDead, match="engine core gone"):
        run_generate(engine_with(llm), stream=True)


def test_vllms_engine_dead_error_is_engine_dead() -> None:
    with pytest.raises(EngineDead, match="died"):
        run_generate(engine_with(FakeAsyncLLM([step([1], "a")], error=EngineDeadError())), stream=True)


def test_a_client_that_left_gets_its_request_aborted() -> None:
    llm = FakeAsyncLLM(NORMAL_RUN)
    engine = engine_with(llm)
    final, emitted = run_generate(engine, stream=True, cancelled=lambda: True)
    assert final is None and emitted == [] and llm.aborted == ["req-1"] and engine.cancelled == 1


# --- triton_io.error_response / engine_sources ----------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "code", "message"), [
    (InvalidInput(""), pb_utils.TritonError.INVALID_ARG, "invalid input: InvalidInput"),
    (EngineDead(""), pb_utils.TritonError.UNAVAILABLE, "unavailable: EngineDead"),
    (RequestFailed(""), pb_utils.TritonError.INTERNAL, "RequestFailed"),
    (TimeoutError(), pb_utils.TritonError.INTERNAL, "TimeoutError"),
    (RequestFailed("KV load failed"), pb_utils.TritonError.INTERNAL, "KV load failed"),
])
def test_error_response_is_never_empty_and_has_the_classs_code(exc: BaseException, code: Any, message: str) -> None:
    error = triton_io.error_response(exc).error()
    assert error.code() == code and error.message() == message


def test_engine_sources_export_the_engines_health() -> None:
    pb_utils.reset()
    engine = engine_with(FakeAsyncLLM())
    engine.restarts, engine.cancelled = 2, 5
    engine.times.add("first_token", 0.25)
    exporter = triton_io.GaugeExporter("llm_decode", triton_io.engine_sources(engine), interval_s=60)
    try:
        def gauge(name: str, item: str) -> float | None:
            return pb_utils.metric_value(name, {"model": "llm_decode", "item": item})

        assert (gauge("mmtriton_engine", "alive"), gauge("mmtriton_engine", "restarts"),
                gauge("mmtriton_engine", "cancelled")) == (1.0, 2.0, 5.0)
        assert gauge("mmtriton_stage_seconds", "first_token") == 0.25
        assert gauge("mmtriton_stage_count", "first_token") == 1.0

        engine.llm.errored, engine.restarts = True, 3
        exporter.refresh()
        assert (gauge("mmtriton_engine", "alive"), gauge("mmtriton_engine", "restarts")) == (0.0, 3.0)
    finally:
        exporter.stop()
        engine.loop.close()
        pb_utils.reset()


# --- families -------------------------------------------------------------------------------------------------------


def audio_layout(num_tokens: int, hidden: int = 8, **fields: Any) -> MediaLayout:
    return MediaLayout(kind="audio", num_tokens=num_tokens, hidden_size=hidden, **fields)


def image_layout(num_tokens: int, grid: tuple[int, int, int], hidden: int = 8) -> MediaLayout:
    return MediaLayout(kind="image", grid_thw=grid, num_tokens=num_tokens, hidden_size=hidden)


def test_qwen2_audio_embeddings_are_a_bare_list_in_order() -> None:
    clips = [torch.full((3, 8), 1.0), torch.full((5, 8), 2.0)]
    mm = family("qwen2-audio").embeddings_mm_data(clips, [audio_layout(3), audio_layout(5)])
    assert list(mm) == ["audio"] and isinstance(mm["audio"], list)
    assert [t.shape[0] for t in mm["audio"]] == [3, 5] and all(a is b for a, b in zip(mm["audio"], clips, strict=True))


def test_qwen2_vl_image_embeddings_are_one_flat_tensor_and_a_grid_per_image() -> None:
    images = [torch.full((4, 8), 1.0), torch.full((2, 8), 2.0)]
    layouts = [image_layout(4, (1, 4, 4)), image_layout(2, (1, 2, 4))]  # merge_size 2: t*h*w / 4 tokens
    mm = family("qwen2-vl").embeddings_mm_data(images, layouts)
    assert list(mm) == ["image"]
    assert torch.equal(mm["image"]["image_embeds"], torch.cat(images))
    assert mm["image"]["image_grid_thw"].dtype == torch.long
    assert mm["image"]["image_grid_thw"].tolist() == [[1, 4, 4], [1, 2, 4]]


def test_check_layout_refuses_what_would_reach_the_engine_wrong() -> None:
    vl, audio = family("qwen2-vl"), family("qwen2-audio")
    vl.check_layout(image_layout(4, (1, 4, 4)))
    audio.check_layout(audio_layout(3))

    with pytest.raises(InvalidInput, match=r"3 tokens do not match grid \[1, 4, 4\]"):
        vl.check_layout(image_layout(3, (1, 4, 4)))
    with pytest.raises(InvalidInput, match="unexpected grid_thw"):
        audio.check_layout(audio_layout(3, grid_thw=(1, 2, 2)))
    with pytest.raises(InvalidInput, match="takes no precomputed audio"):
        vl.check_layout(audio_layout(3))
    vl.check_layout(video_layout(8, (2, 4, 4)))
    with pytest.raises(InvalidInput, match=r"video embedding: 4 tokens do not match grid \[2, 4, 4\]"):
        vl.check_layout(video_layout(4, (2, 4, 4)))
    with pytest.raises(InvalidInput, match="takes no precomputed video"):
        audio.check_layout(video_layout(8, (2, 4, 4)))


def video_layout(num_tokens: int, grid: tuple[int, int, int], hidden: int = 8) -> MediaLayout:
    return MediaLayout(kind="video", grid_thw=grid, num_tokens=num_tokens, hidden_size=hidden)


def test_qwen2_vl_image_and_video_embeddings_go_to_their_own_kinds_in_order() -> None:
    """Prompt order video, image, video: each kind gets its items' tensors in order (vLLM fills each kind's
    placeholders in order), videos as one flat tensor plus a [t, h, w] row each."""
    tensors = [torch.full((8, 8), 1.0), torch.full((4, 8), 2.0), torch.full((6, 8), 3.0)]
    layouts = [video_layout(8, (2, 4, 4)), image_layout(4, (1, 4, 4)), video_layout(6, (1, 4, 6))]
    mm = family("qwen2-vl").embeddings_mm_data(tensors, layouts)
    assert sorted(mm) == ["image", "video"]
    assert torch.equal(mm["video"]["video_embeds"], torch.cat([tensors[0], tensors[2]]))
    assert mm["video"]["video_grid_thw"].dtype == torch.long
    assert mm["video"]["video_grid_thw"].tolist() == [[2, 4, 4], [1, 4, 6]]
    assert torch.equal(mm["image"]["image_embeds"], tensors[1])
    family("qwen2-vl").check_counts("<|video_pad|><|image_pad|><|video_pad|>", layouts)
    with pytest.raises(InvalidInput, match="1 video placeholder.* but 2 video"):
        family("qwen2-vl").check_counts("<|video_pad|><|image_pad|>", layouts)


def test_qwen2_5_vl_takes_image_embeddings_only_and_says_why(tmp_path: Path) -> None:
    """Qwen2.5-VL's video positions need second_per_grid_ts, which vLLM 0.32 takes with pixels only."""
    qwen25 = family_for(checkpoint(tmp_path, "qwen2_5_vl"))
    assert qwen25.name == "qwen2-vl" and qwen25.modalities == ("image", "video")
    assert list(qwen25.embeds) == ["image"] and "second_per_grid_ts" in qwen25.embeds_note
    with pytest.raises(InvalidInput, match="takes no precomputed video"):
        qwen25.check_layout(video_layout(8, (2, 4, 4)))
    assert sorted(family_for(checkpoint(tmp_path / "q2", "qwen2_vl")).embeds) == ["image", "video"]


def test_check_counts_refuses_placeholders_without_embeddings_and_the_reverse() -> None:
    vl, audio = family("qwen2-vl"), family("qwen2-audio")
    one_image = [image_layout(4, (1, 4, 4))]
    vl.check_counts("<|vision_start|><|image_pad|><|vision_end|>say", one_image)
    with pytest.raises(InvalidInput, match="2 image placeholder"):
        vl.check_counts("<|image_pad|><|image_pad|>say", one_image)
    with pytest.raises(InvalidInput, match="0 image placeholder"):
        vl.check_counts("say", one_image)

    audio.check_counts("<|audio_bos|><|AUDIO|><|audio_eos|>x<|audio_bos|><|AUDIO|><|audio_eos|>",
                       [audio_layout(3), audio_layout(5)])
    with pytest.raises(InvalidInput, match="1 audio placeholder.* but 2 audio"):
        audio.check_counts("<|audio_bos|><|AUDIO|><|audio_eos|>", [audio_layout(3), audio_layout(5)])


# --- wire -----------------------------------------------------------------------------------------------------------


def test_parse_placement_takes_known_kinds_only() -> None:
    assert parse_placement({"kind": "audio"}, "e1") == MediaPlacement(kind="audio")
    assert parse_placement({"kind": "image", "grid_thw": [1, 4, 4]}, "e1").grid_thw == (1, 4, 4)
    for bad in ({"kind": "pointcloud"}, {"kind": "image", "grid_thw": [1, 4]}, {"kind": "image", "grid_thw": "x"},
                {"kind": "audio", "sample_rate": 16000}, {}):
        with pytest.raises(InvalidInput, match="^embedding 7f: "):
            parse_placement(bad, "embedding 7f")


def prefill_result() -> PrefillResult:
    return PrefillResult(kv_transfer_params={"remote_engine_id": "p0", "remote_block_ids": [1, 2]},
                         num_input_tokens=12, media=[audio_layout(3)])


def test_a_signed_prefill_result_verifies_after_the_json_hop() -> None:
    key = b"k" * 32
    signed = sign(prefill_result(), key)
    wire = DecodeRequest(prompt="p", prefill=signed, sampling=SamplingOptions(max_tokens=4)).model_dump_json()
    verify(parse_stage(DecodeRequest, wire, "decode_request").prefill, key)


@pytest.mark.parametrize("tamper", [
    lambda r: r.model_copy(update={"kv_transfer_params": {**r.kv_transfer_params, "remote_block_ids": [9]}}),
    lambda r: r.model_copy(update={"num_input_tokens": 13}),
    lambda r: r.model_copy(update={"media": [audio_layout(4)]}),
    lambda r: r.model_copy(update={"signature": ""}),
])
def test_an_altered_or_unsigned_prefill_result_is_refused(tamper) -> None:
    key = b"k" * 32
    with pytest.raises(InvalidInput, match="not signed by this server's prefill"):
        verify(tamper(sign(prefill_result(), key)), key)


def test_a_prefill_result_signed_with_another_key_is_refused() -> None:
    with pytest.raises(InvalidInput, match="not signed"):
        verify(sign(prefill_result(), b"a" * 32), b"b" * 32)


# --- EncoderService -------------------------------------------------------------------------------------------------


def checkpoint(tmp_path: Path, model_type: str) -> Path:
    """A checkpoint directory as far as the encoder service reads it: its config.json (the family)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return tmp_path


class FakeAudioEncoder:
    """A MediaEncoder: ``fake:<tokens>`` URLs load as that many frames of 160 samples; ``bad:`` ones fail by name."""

    kind = "audio"
    kinds = ("audio",)

    def __init__(self) -> None:
        self.passes: list[int] = []  # items per encode_many call

    async def load(self, media: MediaLoader, item: MediaItem, video: VideoOptions | None = None) -> np.ndarray:
        if not item.url.startswith("fake:"):
            raise InvalidInput(f"{item.where}: cannot decode audio")
        return np.zeros(int(item.url.removeprefix("fake:")) * 160, dtype=np.float32)

    def encode_many(self, loaded: list[np.ndarray]) -> list[EncodedMedia]:
        self.passes.append(len(loaded))
        return [EncodedMedia(torch.ones(len(wave) // 160, 8)) for wave in loaded]


def audio(url: str, where: str) -> MediaItem:
    return MediaItem("audio", url, where)


def test_an_encoder_service_for_a_family_without_the_modality_refuses_items_by_name(tmp_path: Path) -> None:
    service = EncoderService("audio", Settings(model=str(checkpoint(tmp_path, "qwen2_vl"))), encoder=None)
    try:
        assert service.sender is None and service.tower_name == "none (qwen2-vl)"
        nothing, refused = asyncio.run(service.encode_batch([[], [audio("fake:3", "audio_url[0]")]]))
        assert nothing == []
        assert isinstance(refused, InvalidInput)
        assert str(refused).startswith("audio_url[0]: ") and "does not take audio input" in str(refused)
        assert service.batching == {"batches": 0, "requests": 0, "max_requests": 0}
    finally:
        service.close()


def test_an_encoder_service_batches_requests_and_fails_only_the_bad_one(tmp_path: Path) -> None:
    settings = Settings(model=str(checkpoint(tmp_path, "qwen2_audio")), embedding_pool_mib=4,
                        embedding_ack_timeout_s=30)
    tower = FakeAudioEncoder()
    service = EncoderService("audio", settings, tower, agent_name=f"{TAG}-enc")
    receiver = EmbeddingReceiver(f"{TAG}-rcv", 1 << 20)
    try:
        good, bad = asyncio.run(service.encode_batch([
            [audio("fake:3", "messages[0].content[0]"), audio("fake:5", "messages[0].content[1]")],
            [audio("fake:2", "audio_url[0]"), audio("bad:x", "audio_url[1]")],
        ]))

        assert isinstance(bad, InvalidInput) and str(bad) == "audio_url[1]: cannot decode audio"
        descriptors = [EmbeddingDescriptor.from_json(raw) for raw in good]
        assert [d.shape for d in descriptors] == [(3, 8), (5, 8)]
        assert all(parse_placement(d.extra, d.transfer_id) == MediaPlacement(kind="audio") for d in descriptors)
        # One forward pass for the requests that loaded; the failed request's good item was not encoded.
        assert tower.passes == [2]
        assert service.batching == {"batches": 1, "requests": 2, "max_requests": 2}
        # The descriptors point at the values in the pool (NIXL READ), and reading acks them.
        assert all(torch.equal(receiver.fetch(d, timeout_s=10), torch.ones(d.shape)) for d in descriptors)

        [[single]] = asyncio.run(service.encode_batch([[audio("fake:1", "audio_url[0]")]]))
        assert EmbeddingDescriptor.from_json(single).shape == (1, 8)
        assert service.batching == {"batches": 2, "requests": 3, "max_requests": 2}
    finally:
        receiver.close()
        service.close()


class FakeVisionEncoder:
    """A MediaEncoder for images and videos: ``img:<tokens>`` / ``vid:<tokens>`` URLs; records the video options
    each video was loaded with."""

    kind = "image"
    kinds = ("image", "video")

    def __init__(self) -> None:
        self.video_options: list[VideoOptions | None] = []

    async def load(self, media: MediaLoader, item: MediaItem, video: VideoOptions | None = None) -> tuple[str, int]:
        if item.kind == "video":
            self.video_options.append(video)
        return item.kind, int(item.url.split(":")[1])

    def encode_many(self, loaded: list[tuple[str, int]]) -> list[EncodedMedia]:
        return [EncodedMedia(torch.full((n, 8), float(n)), (1, 2, 2 * n)) for _, n in loaded]


def test_the_image_encoder_service_encodes_videos_too_and_each_placement_says_its_items_kind(tmp_path: Path) -> None:
    settings = Settings(model=str(checkpoint(tmp_path, "qwen2_vl")), embedding_pool_mib=4, embedding_ack_timeout_s=30)
    tower = FakeVisionEncoder()
    service = EncoderService("image", settings, tower, agent_name=f"{TAG}-vis")
    receiver = EmbeddingReceiver(f"{TAG}-vis-rcv", 1 << 20)
    four = VideoOptions(num_frames=4)
    try:
        assert service.kinds == ("image", "video")
        mixed, videos_only, refused = asyncio.run(service.encode_batch([
            [MediaItem("video", "vid:3", "messages[0].content[0]"), MediaItem("image", "img:2", "m[0].c[1]")],
            [MediaItem("video", "vid:5", "video_url[0]")],
            [MediaItem("audio", "a:1", "audio_url[0]")],
        ], [four, None, None]))
        assert isinstance(refused, InvalidInput)
        assert str(refused) == "audio_url[0]: a audio item sent to the image encoder (it encodes: image, video)"
        assert tower.video_options == [four, None]  # each request's own options
        placed = [EmbeddingDescriptor.from_json(raw) for raw in [*mixed, *videos_only]]
        assert [parse_placement(d.extra, "e") for d in placed] == [
            MediaPlacement(kind="video", grid_thw=(1, 2, 6)), MediaPlacement(kind="image", grid_thw=(1, 2, 4)),
            MediaPlacement(kind="video", grid_thw=(1, 2, 10))]
        assert all(torch.equal(receiver.fetch(d, timeout_s=10), torch.full(d.shape, float(d.shape[0]))) for d in placed)
    finally:
        receiver.close()
        service.close()


# --- Orchestrator ---------------------------------------------------------------------------------------------------


class StageCalls:
    """The Orchestrator's stage callables, recording what they were asked."""

    def __init__(self) -> None:
        self.encoded: list[tuple[str, list[MediaItem], MediaIOKwargs | None]] = []
        self.prefilled: list[PrefillRequest] = []
        self.decoded: list[DecodeRequest] = []
        self.result = PrefillResult(kv_transfer_params={"remote_engine_id": "p0"}, num_input_tokens=9)

    async def encode(self, encoder: str, items: list[MediaItem], options: MediaIOKwargs | None) -> list[str]:
        self.encoded.append((encoder, items, options))
        return [f"descriptor-of-{item.where}" for item in items]

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        self.prefilled.append(request)
        return self.result

    async def decode(self, request: DecodeRequest) -> None:
        self.decoded.append(request)


def user_request(*parts: dict[str, Any], media: list[MediaItem], stream: bool = False,
                 sampling: SamplingOptions | None = None) -> GenerateRequest:
    return GenerateRequest(messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "what?"}]}],
                           media=media, sampling=sampling or SamplingOptions(max_tokens=3), stream=stream)


def test_an_audio_request_goes_to_the_audio_encoder_only(tiny_models: dict[str, Path]) -> None:
    calls = StageCalls()
    orchestrator = Orchestrator(Settings(model=str(tiny_models["qwen2-audio"])), calls.encode, calls.prefill)
    clips = [audio("data:a", "messages[0].content[0]"), audio("data:b", "messages[0].content[1]")]

    asyncio.run(orchestrator.run(user_request({"type": "audio"}, {"type": "audio"}, media=clips, stream=True),
                                 calls.decode))

    assert calls.encoded == [("audio", clips, None)]
    [prefill] = calls.prefilled
    assert prefill.embeddings == ["descriptor-of-messages[0].content[0]", "descriptor-of-messages[0].content[1]"]
    assert prefill.prompt.count("<|AUDIO|>") == 2 and prefill.stream and prefill.sampling.max_tokens == 3
    [decode] = calls.decoded
    assert decode.prompt == prefill.prompt and decode.prefill == calls.result and decode.stream


def test_a_text_only_request_calls_no_encoder(tiny_models: dict[str, Path]) -> None:
    calls = StageCalls()
    orchestrator = Orchestrator(Settings(model=str(tiny_models["qwen2-vl"])), calls.encode, calls.prefill)

    asyncio.run(orchestrator.run(user_request(media=[]), calls.decode))

    assert calls.encoded == []
    assert [p.embeddings for p in calls.prefilled] == [[]] and len(calls.decoded) == 1


def test_images_and_videos_go_to_encoder_image_in_prompt_order_with_the_requests_video_options(
        tiny_models: dict[str, Path]) -> None:
    calls = StageCalls()
    orchestrator = Orchestrator(Settings(model=str(tiny_models["qwen2-vl"])), calls.encode, calls.prefill)
    media = [MediaItem("video", "data:v0", "messages[0].content[0]"),
             MediaItem("image", "data:i0", "messages[0].content[1]"),
             MediaItem("video", "data:v1", "messages[0].content[2]")]
    options = MediaIOKwargs(video=VideoOptions(num_frames=4))

    asyncio.run(orchestrator.run(user_request({"type": "video"}, {"type": "image"}, {"type": "video"}, media=media,
                                              sampling=SamplingOptions(max_tokens=3, media_io_kwargs=options)),
                                 calls.decode))

    assert calls.encoded == [("image", media, options)]  # one call: Qwen2-VL's one tower serves both kinds
    [prefill] = calls.prefilled
    assert prefill.embeddings == [f"descriptor-of-messages[0].content[{i}]" for i in range(3)]
    assert prefill.prompt.count("<|video_pad|>") == 2 and prefill.prompt.count("<|image_pad|>") == 1
    assert prefill.prompt.index("<|video_pad|>") < prefill.prompt.index("<|image_pad|>")
    assert prefill.sampling.media_io_kwargs == options and calls.decoded[0].sampling.media_io_kwargs == options


def test_media_a_family_does_not_take_is_refused_before_any_stage(tiny_models: dict[str, Path]) -> None:
    calls = StageCalls()
    orchestrator = Orchestrator(Settings(model=str(tiny_models["qwen2-audio"])), calls.encode, calls.prefill)
    with pytest.raises(InvalidInput, match="does not take image input"):
        asyncio.run(orchestrator.run(user_request({"type": "image"}, media=[MediaItem("image", "data:i", "x")]),
                                     calls.decode))
    assert calls.encoded == [] and calls.prefilled == []


# --- triton_bls.forward / raise_for ---------------------------------------------------------------------------------


@pytest.fixture
def responses() -> Iterator[triton_io.ResponseThread]:
    pb_utils.reset()
    thread = triton_io.ResponseThread(pb_utils.Logger)
    yield thread
    thread.stop(timeout_s=2)
    pb_utils.reset()


def client_channel(responses: triton_io.ResponseThread) -> tuple[Any, triton_io.ResponseChannel]:
    request = pb_utils.incoming_request({"text_input": np.array([b"hi"], dtype=np.object_)},
                                        requested_output_names=OUTPUT_NAMES, model_name="multimodal_bls")
    return request, triton_io.ResponseChannel(request, responses)


def chunk(i: int, last: bool) -> GenerationChunk:
    return GenerationChunk(text=f"t{i}", token_ids=[i], finish_reason="length" if last else "", num_input_tokens=3,
                           num_output_tokens=i + 1, finished=last)


def decode_call(handler) -> Any:
    """llm_decode played by ``handler``, called through the fake's BLS (its wire conversions, its empty final)."""
    pb_utils.register_model("llm_decode", handler)
    request = pb_utils.InferenceRequest(
        model_name="llm_decode", inputs=[triton_bls.string_tensor("decode_request", ["{}"])],
        requested_output_names=OUTPUT_NAMES)
    return request.exec(decoupled=True)


def text_of(response) -> str:
    return pb_utils.get_output_tensor_by_name(response, "text_output").as_numpy()[0].decode()


def test_forward_sends_decodes_responses_in_order_with_one_final_on_the_last(responses) -> None:
    request, channel = client_channel(responses)
    triton_bls.forward(decode_call(lambda _r: [triton_io.chunk_response(chunk(i, i == 2)) for i in range(3)]),
                       channel)

    sent = request.get_response_sender().wait_final()
    assert [text_of(r) for r, _ in sent] == ["t0", "t1", "t2"]
    assert [flags for _, flags in sent] == [0, 0, FINAL]
    assert pb_utils.get_output_tensor_by_name(sent[-1][0], "finish_reason").as_numpy()[0] == b"length"


def test_forward_sends_each_response_before_the_next_one_comes(responses) -> None:
    # The first token (from prefill) must reach the client while llm_decode still waits for the KV: forward
    # sends each response as it comes, it holds none back for the FINAL flag.
    request, channel = client_channel(responses)
    items = list(decode_call(lambda _r: [triton_io.chunk_response(chunk(i, i == 2)) for i in range(3)]))
    out_before: list[int] = []

    def taking(_n: int) -> None:  # what the client has when forward takes the next response from llm_decode
        assert responses.drain(timeout_s=5.0)
        out_before.append(len(request.get_response_sender().sent))

    triton_bls.forward(CancellableResponses(items, on_take=taking), channel)
    assert out_before[:3] == [0, 1, 2]  # when response 2 (3) is taken, response 1 (2) is out already


def test_forward_ends_an_answer_whose_last_response_names_no_finish_reason(responses) -> None:
    request, channel = client_channel(responses)
    triton_bls.forward(decode_call(lambda _r: [triton_io.chunk_response(chunk(i, False)) for i in range(2)]),
                       channel)
    sent = request.get_response_sender().wait_final()
    assert [flags for _, flags in sent] == [0, 0, FINAL] and sent[-1][0] is None


@pytest.mark.parametrize(("exc", "raised", "text"), [
    (EngineDead("the vLLM engine died"), EngineDead, "llm_decode: the vLLM engine died"),
    (InvalidInput("prompt too long"), InvalidInput, "prompt too long"),
    (RequestFailed("KV load failed"), RuntimeError, "llm_decode: KV load failed"),
])
def test_forward_raises_decodes_error_with_its_class(responses, exc, raised, text) -> None:
    # Through BLS the code arrives as INTERNAL: the class must come back from the text's prefix.
    _request, channel = client_channel(responses)
    calls = decode_call(lambda _r: [triton_io.chunk_response(chunk(0, False)), triton_io.error_response(exc)])
    with pytest.raises(raised) as info:
        triton_bls.forward(calls, channel)
    assert type(info.value) is raised and str(info.value) == text


def test_raise_for_reads_the_prefix_after_text_triton_puts_in_front() -> None:
    def error(message: str) -> Any:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))

    with pytest.raises(EngineDead, match="^encoder_audio: engine gone$"):
        triton_bls.raise_for(error("in ensemble 'x': unavailable: engine gone"), "encoder_audio")
    with pytest.raises(InvalidInput, match=r"^audio_url\[0\]: too short$"):
        triton_bls.raise_for(error("invalid input: audio_url[0]: too short"), "encoder_audio")
    with pytest.raises(RuntimeError, match="^llm_prefill: failed without a message$"):
        triton_bls.raise_for(error(""), "llm_prefill")
    triton_bls.raise_for(pb_utils.InferenceResponse(), "llm_prefill")  # no error: nothing raised


class CancellableResponses:
    """A decoupled BLS iterator that counts what was taken from it and whether it was cancelled."""

    def __init__(self, items: list[Any], on_take=None):
        self.items, self.on_take = items, on_take
        self.taken = 0
        self.cancelled = False

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            self.taken += 1
            if self.on_take is not None:
                self.on_take(self.taken)
            yield item

    def cancel(self) -> None:
        self.cancelled = True


def test_forward_stops_when_the_client_has_gone_and_ends_with_an_empty_final(responses) -> None:
    request, channel = client_channel(responses)
    channel.CANCEL_POLL_S = 0.0  # ask Triton on every response, so the cancel is seen at the next one
    items = list(decode_call(lambda _r: [triton_io.chunk_response(chunk(i, i == 4)) for i in range(5)]))
    decode = CancellableResponses(items, on_take=lambda n: n == 2 and request.cancel())

    triton_bls.forward(decode, channel)

    sent = request.get_response_sender().wait_final()
    # The first response went out as it came; the cancel, seen at the second, ends the stream with flags only.
    assert [text_of(r) if r is not None else None for r, _ in sent] == ["t0", None]
    assert [flags for _, flags in sent] == [0, FINAL]
    assert decode.taken == 2 and decode.cancelled  # nothing more read from llm_decode, and its request cancelled


def test_forward_of_a_decode_that_sent_nothing_is_an_error(responses) -> None:
    request, channel = client_channel(responses)
    with pytest.raises(RuntimeError, match="llm_decode sent no output"):
        triton_bls.forward(decode_call(lambda _r: []), channel)
    assert request.get_response_sender().sent == []  # the caller (dispatch) sends the error response
