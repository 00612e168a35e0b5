"""The disaggregated pipeline as plain Python: encode → (NIXL) → prefill → (vLLM KV connector) → decode.

Each stage is a class the matching Triton model wraps (the encoders' is mmtriton.encoder_service);
``Orchestrator`` chains them for the BLS model through callables, so it runs the same with Triton BLS calls or
direct calls.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mmtriton.chat import ChatFormatter
from mmtriton.encoder_service import SERVED_KINDS
from mmtriton.engine import (
    EngineDead,
    FirstOutputTimeout,
    GenerationChunk,
    VllmEngine,
    engine_args_for,
    kv_transfer_args,
    to_vllm_sampling,
)
from mmtriton.families import Family, checkpoint_config, family_for
from mmtriton.protocol import GenerateRequest, InvalidInput, MediaIOKwargs, MediaItem, SamplingOptions
from mmtriton.settings import Settings
from mmtriton.transfer import EmbeddingDescriptor, EmbeddingReceiver
from mmtriton.wire import (
    TOKENS_AFTER_PREFILL,
    DecodeCancel,
    DecodeRequest,
    FirstToken,
    MediaLayout,
    PrefillRequest,
    PrefillResult,
    parse_placement,
    pipeline_secret,
    sign,
    verify,
)

MiB = 1024 * 1024


def text_hidden_size(model_path: str) -> int:
    config = checkpoint_config(model_path)
    config = config.get("thinker_config") or config  # Qwen2.5-Omni: the thinker holds the language model
    return int((config.get("text_config") or config)["hidden_size"])


# ---- prefill ---------------------------------------------------------------------------------------------
class PrefillService:
    """Pulls the embeddings over NIXL, runs prefill (one token) as KV producer, returns signed hand-over data."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.model_path = settings.model_path()
        self.family: Family = family_for(self.model_path)
        self.hidden_size = text_hidden_size(self.model_path)
        self.key = pipeline_secret()
        self.receiver = EmbeddingReceiver(f"llm_prefill-{os.getpid()}", settings.embedding_pool_mib * MiB)
        self.engine = kv_engine(settings, "kv_producer")
        self.detokenizer = vllm_detokenizer  # (tokenizer, prompt ids, vLLM SamplingParams) → Detokenizer

    async def run(self, request: PrefillRequest) -> PrefillResult:
        if len(request.embeddings) > self.settings.max_media_items:
            # vLLM does not count embeddings for a kind whose limit is 0 (embeddings_only_limits): we do.
            raise InvalidInput(f"too many embeddings: {len(request.embeddings)} > {self.settings.max_media_items}")
        descriptors = [parse_descriptor(raw) for raw in request.embeddings]
        if not self.engine.alive:
            # Nothing will read these: let the encoders free them now rather than at their ack timeout.
            for desc in descriptors:
                await asyncio.to_thread(self.receiver.discard, desc)
            raise EngineDead("llm_prefill: the vLLM engine is not running (restarting after a crash)")
        with self.engine.times.time("embedding_fetch"):
            tensors = await asyncio.gather(*(
                asyncio.to_thread(self.receiver.fetch, d, self.settings.stage_timeout_s) for d in descriptors
            ))
        layouts = [self._layout(d, t) for d, t in zip(descriptors, tensors, strict=True)]
        self.family.check_counts(request.prompt, layouts)
        prompt: dict[str, Any] = {"prompt": request.prompt}
        if tensors:
            prompt["multi_modal_data"] = self.family.embeddings_mm_data(list(tensors), layouts)
        params = to_vllm_sampling(
            request.sampling.model_copy(update={"max_tokens": 1, "min_tokens": 0}),
            extra_args={"kv_transfer_params": {"do_remote_decode": True}},
        )
        # What decode needs before it can send the first token, worked out while the engine computes it.
        context = (asyncio.ensure_future(asyncio.to_thread(self.text_context, request))
                   if self.settings.first_token_from_prefill else None)
        try:
            final = await self.engine.generate(uuid.uuid4().hex, prompt, params, stream=False,
                                               emit=lambda _chunk: None, cancelled=lambda: False)
            if final is None or "kv_transfer_params" not in final.extra:
                raise EngineDead("prefill returned no kv_transfer_params")
            first = first_token_of(final, request.sampling, await context) if context is not None else None
        finally:
            if context is not None and not context.done():
                context.cancel()
        result = PrefillResult(kv_transfer_params=final.extra["kv_transfer_params"],
                               num_input_tokens=final.num_input_tokens, media=layouts, first_token=first)
        return sign(result, self.key)

    def text_context(self, request: PrefillRequest) -> TextContext:
        """The text prompt's token ids as vLLM tokenizes it, and a detokenizer primed with them (as decode's)."""
        tokenizer = self.engine.llm.tokenizer
        prompt_ids = tokenizer.encode(request.prompt)
        return TextContext(prompt_ids, self.detokenizer(tokenizer, prompt_ids, to_vllm_sampling(request.sampling)))

    def _layout(self, desc: EmbeddingDescriptor, tensor: torch.Tensor) -> MediaLayout:
        if tensor.dim() != 2 or tensor.shape[1] != self.hidden_size:
            raise InvalidInput(f"embedding {desc.transfer_id}: shape {list(tensor.shape)} is not [tokens, "
                               f"{self.hidden_size}]")
        placement = parse_placement(desc.extra, f"embedding {desc.transfer_id}")
        layout = MediaLayout(**placement.model_dump(), num_tokens=int(tensor.shape[0]), hidden_size=self.hidden_size,
                             dtype=str(tensor.dtype).removeprefix("torch."))
        self.family.check_layout(layout)
        return layout


class Detokenizer(Protocol):
    """vLLM's incremental detokenizer (vllm.v1.engine.detokenizer), as FirstTokenAhead uses it."""

    def update(self, new_token_ids: list[int], stop_terminated: bool) -> str | None: ...

    def get_next_output_text(self, finished: bool, delta: bool) -> str: ...


def vllm_detokenizer(tokenizer: Any, prompt_token_ids: list[int], params: Any) -> Detokenizer:
    """The detokenizer vLLM builds for a request (fast or slow as the tokenizer is), primed with its prompt."""
    from types import SimpleNamespace

    from vllm.v1.engine.detokenizer import IncrementalDetokenizer

    request = SimpleNamespace(request_id="mmtriton-first-token-ahead", prompt_token_ids=prompt_token_ids,
                              prompt_embeds=None, sampling_params=params)
    return IncrementalDetokenizer.from_new_request(tokenizer, request)


@dataclass
class TextContext:
    """The text prompt's token ids (media placeholders unexpanded) and a detokenizer primed with them."""

    prompt_token_ids: list[int]
    detokenizer: Detokenizer


def first_token_of(final: GenerationChunk, sampling: SamplingOptions, context: TextContext) -> FirstToken | None:
    """The token prefill sampled, when decode may go on from it: prefill stopped only at its own max_tokens of 1
    (not at EOS or a stop string), the client asked for more, and gave no stop strings (vLLM matches those in the
    text an engine generates, and decode would have to stop itself on one spanning this token). Otherwise None:
    decode computes the first token itself, as before. The token's text and the prompt's ids come along, from
    ``context`` (FirstToken)."""
    if final.finish_reason != "length" or len(final.token_ids) != 1 or sampling.max_tokens < 2 or sampling.stop:
        return None
    token_id = final.token_ids[0]
    context.detokenizer.update([token_id], False)
    return FirstToken(token_id=token_id, text=context.detokenizer.get_next_output_text(False, True),
                      prompt_token_ids=context.prompt_token_ids)


def first_token_head(request: DecodeRequest) -> GenerationChunk | None:
    """The response that sends prefill's first token, for a streamed request whose prefill handed one over; None
    otherwise (not streamed: the one response holds every token; or decode computes the first token itself)."""
    first = request.prefill.first_token
    if first is None or not request.stream:
        return None
    return GenerationChunk(text=first.text, token_ids=[first.token_id], finish_reason="",
                           num_input_tokens=request.prefill.num_input_tokens, num_output_tokens=1, finished=False)


class FirstTokenAhead:
    """Decode of a request whose first token came from prefill (``FirstToken``): that token goes to the client
    at once; vLLM decodes from prompt + that token (the KV connector loads the prompt's KV only:
    TOKENS_AFTER_PREFILL), with one token less to make, and without text: the text comes from a detokenizer of
    ours primed with the prompt alone, so the first token is part of the answer's text as on one engine (primed
    with prompt + first token, vLLM's own printed the prompt's text when that token was one byte of a
    character). Counts are the client's; a non-streamed answer is joined into one response."""

    def __init__(self, first: FirstToken, detokenizer: Detokenizer, num_input_tokens: int, stream: bool,
                 emit: Callable[[GenerationChunk], None]):
        self.first, self.detokenizer = first, detokenizer
        self.num_input_tokens, self.stream, self._emit = num_input_tokens, stream, emit
        detokenizer.update([first.token_id], False)
        self.first_text = detokenizer.get_next_output_text(False, True)

    def emit(self, chunk: GenerationChunk) -> None:
        self.detokenizer.update(chunk.token_ids, chunk.finish_reason == "stop")
        chunk.text = self.detokenizer.get_next_output_text(chunk.finished, True)
        chunk.num_input_tokens = self.num_input_tokens  # the client's prompt, without the first token
        chunk.num_output_tokens += 1
        if not self.stream:  # the single response holds the whole answer
            chunk.text = self.first_text + chunk.text
            chunk.token_ids = [self.first.token_id, *chunk.token_ids]
        self._emit(chunk)

    @staticmethod
    def sampling(options: SamplingOptions) -> SamplingOptions:
        return options.model_copy(update={"max_tokens": options.max_tokens - 1,
                                          "min_tokens": max(0, options.min_tokens - 1)})


# ---- decode ----------------------------------------------------------------------------------------------
CANCEL_MEMORY_S = 60.0  # how long llm_decode remembers a DecodeCancel for a request it has not (yet) seen


class DecodeService:
    """KV consumer: continues from a signed prefill hand-over and streams tokens."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.family = family_for(settings.model_path())
        self.key = pipeline_secret()
        self.engine = kv_engine(settings, "kv_consumer")
        self.engine.stalls_to_restart = settings.decode_stalls_to_restart
        self.detokenizer = vllm_detokenizer  # (tokenizer, prompt ids, vLLM SamplingParams) → Detokenizer
        # request_id → when its DecodeCancel came (a cancel may come before its decode starts, or after it ended:
        # kept a while, then forgotten).
        self._cancels: dict[str, float] = {}

    def cancel(self, cancel: DecodeCancel) -> None:
        now = time.monotonic()
        self._cancels = {rid: t for rid, t in self._cancels.items() if now - t < CANCEL_MEMORY_S}
        self._cancels[cancel.request_id] = now

    async def run(self, request: DecodeRequest, emit: Callable[[GenerationChunk], None],
                  cancelled: Callable[[], bool], triton_request_id: str = "") -> GenerationChunk | None:
        """``triton_request_id``: the id of the Triton request this decode serves. An ensemble gives its steps
        the client's id, and Triton 2.51's ensemble never cancels a step already running (only steps it
        schedules after the cancel), so a DecodeCancel by that id (our OpenAI server sends one when its client
        goes) is how such a decode stops. Only a cancel that comes while it runs counts: unlike the BLS's
        uuids, a client's ids may repeat."""
        verify(request.prefill, self.key)
        rid = request.request_id or triton_request_id
        if not request.request_id:
            self._cancels.pop(rid, None)  # an earlier request's cancel under the same id is not ours
        if rid:
            asked = cancelled
            cancelled = lambda: rid in self._cancels or asked()  # noqa: E731 - the engine polls it
        try:
            return await self._run(request, emit, cancelled)
        finally:
            self._cancels.pop(rid, None)

    async def _run(self, request: DecodeRequest, emit: Callable[[GenerationChunk], None],
                   cancelled: Callable[[], bool]) -> GenerationChunk | None:
        first = request.prefill.first_token
        kv_transfer_params = dict(request.prefill.kv_transfer_params)
        prompt: dict[str, Any] = {"prompt": request.prompt}
        if first is not None:
            t0 = time.perf_counter()
            # Before the KV transfer, and before anything else here: the client's time to first token is prefill's.
            if (head := first_token_head(request)) is not None and not request.first_token_sent:
                emit(head)
            ahead = FirstTokenAhead(first, self.detokenizer(self.engine.llm.tokenizer, first.prompt_token_ids,
                                                            to_vllm_sampling(request.sampling)),
                                    request.prefill.num_input_tokens, request.stream, emit)
            self.engine.times.add("first_token_ahead", time.perf_counter() - t0)
            # The prompt's token ids as vLLM tokenizes a text prompt (prefill's: media placeholders unexpanded, vLLM
            # expands them), then the first token, whose KV decode computes itself.
            prompt = {"prompt_token_ids": [*first.prompt_token_ids, first.token_id]}
            kv_transfer_params[TOKENS_AFTER_PREFILL] = 1
            params = to_vllm_sampling(ahead.sampling(request.sampling), detokenize=False,
                                      extra_args={"kv_transfer_params": kv_transfer_params})
            emit = ahead.emit
        else:
            params = to_vllm_sampling(request.sampling, extra_args={"kv_transfer_params": kv_transfer_params})
        if request.prefill.media:
            # The KV comes from prefill; decode needs the media's shape and grid for positions (M-RoPE), not
            # its values: zeros of the right shape give the same tokens.
            layouts = request.prefill.media
            zeros = [torch.zeros(m.num_tokens, m.hidden_size, dtype=getattr(torch, m.dtype)) for m in layouts]
            prompt["multi_modal_data"] = self.family.embeddings_mm_data(zeros, layouts)
        try:
            return await self.engine.generate(uuid.uuid4().hex, prompt, params, request.stream, emit, cancelled,
                                              first_output_timeout_s=self.settings.decode_first_token_timeout_s)
        except FirstOutputTimeout as exc:
            # Not silent and not forever: the client gets this error; repeated, the engine is replaced.
            raise RuntimeError(f"llm_decode: the KV cache from llm_prefill did not arrive: {exc}") from exc


def core_split() -> tuple[str, str]:
    """(prefill cores, decode cores) as VLLM_CPU_OMP_THREADS_BIND values: halves of the cores we may use."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return str(cores[0]), str(cores[0])
    half = len(cores) // 2
    return ",".join(map(str, cores[:half])), ",".join(map(str, cores[half:]))


def kv_engine(settings: Settings, role: str) -> VllmEngine:
    """The prefill ("kv_producer") or decode ("kv_consumer") engine: embeddings only, NixlConnector, own cores."""
    producer = role == "kv_producer"
    prefill_cores, decode_cores = core_split()
    cores = (settings.omp_bind_prefill or prefill_cores) if producer else (settings.omp_bind_decode or decode_cores)
    env = {
        "VLLM_CPU_OMP_THREADS_BIND": cores,
        "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib),
        "VLLM_NIXL_SIDE_CHANNEL_HOST": settings.kv_side_channel_host,
        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(settings.prefill_kv_port if producer else settings.decode_kv_port),
        # UCX listens on every interface unless told otherwise: loopback unless the user chose.
        "UCX_NET_DEVICES": os.environ.get("UCX_NET_DEVICES", "lo"),
    }
    # Decode gets zero embeddings (the KV comes from prefill), so its prefix cache would key every image of one
    # shape alike: a second image of the same size after the same text reused the first's KV from decode's own
    # cache (other tokens, no error; tests/test_disagg_server.py, images of one shape in a row). Prefill's keys
    # hold the real embeddings and stay cached.
    no_prefix_cache = {} if producer else {"enable_prefix_caching": False}
    args = engine_args_for(settings, embeddings_only_limits(family_for(settings.model_path())),
                           **kv_transfer_args(role), **no_prefix_cache)
    return VllmEngine(args, env=env, on_death=settings.engine_on_death)


def embeddings_only_limits(family: Family) -> dict[str, int]:
    """``limit_mm_per_prompt`` for an engine that takes precomputed embeddings only: 0 for every media kind.

    With ``enable_mm_embeds``, vLLM then builds no tower for those kinds (a placeholder module, no weights
    loaded) yet still takes their embeddings, without counting them: PrefillService bounds the count.
    (A limit above 0 for any kind a tower serves, e.g. image for Qwen2-VL's image+video tower, builds it.)
    Measured on vLLM 0.32 CPU: Qwen2-VL with {"image": 0, "video": 0} takes ``video_embeds`` + ``video_grid_thw``
    and gives the tokens the same engine gives for the frames' pixels.
    """
    return dict.fromkeys(family.modalities, 0)


# ---- orchestration (BLS) ---------------------------------------------------------------------------------
# (encoder, its items in prompt order, the request's media options) → one descriptor JSON string per item, in order.
EncodeCall = Callable[[str, list[MediaItem], MediaIOKwargs | None], Awaitable[list[str]]]
PrefillCall = Callable[[PrefillRequest], Awaitable[PrefillResult]]
DecodeCall = Callable[[DecodeRequest], Awaitable[None]]


class RequestPlanner:
    """Public request → the prompt (model's chat template) and the media to encode, in prompt order."""

    def __init__(self, settings: Settings):
        self.model_path = settings.model_path()
        self.family = family_for(self.model_path)
        self.chat = ChatFormatter(self.model_path)

    def plan(self, request: GenerateRequest) -> tuple[PrefillRequest, list[MediaItem]]:
        self.family.check_media([m.kind for m in request.media], self.model_path)
        for item in request.media:
            if item.kind not in self.family.embeds:
                why = f" ({self.family.embeds_note})" if self.family.embeds_note else ""
                raise InvalidInput(f"{item.where}: {item.kind} is not served by the disaggregated path for "
                                   f"{self.family.name}{why}; use multimodal_agg")
        prefill = PrefillRequest(prompt=self.chat.render(request.messages), sampling=request.sampling,
                                 stream=request.stream)
        return prefill, list(request.media)


def items_of(kind: str, items: Iterable[MediaItem]) -> list[MediaItem]:
    return [m for m in items if m.kind == kind]


def encoder_items(encoder: str, items: Iterable[MediaItem]) -> list[MediaItem]:
    """The items encoder_<encoder> encodes (encoder_image: images and videos), in prompt order."""
    return [m for m in items if m.kind in SERVED_KINDS[encoder]]


def parse_descriptor(raw: str) -> EmbeddingDescriptor:
    try:
        return EmbeddingDescriptor.from_json(raw)
    except ValueError as exc:
        raise InvalidInput(f"embedding descriptor: {exc}") from exc


def decode_request_for(request: PrefillRequest, result: PrefillResult) -> DecodeRequest:
    return DecodeRequest(prompt=request.prompt, prefill=result, sampling=request.sampling, stream=request.stream)


ENCODED_KINDS = ("image", "audio")  # the encoder models (encoder_<kind>); the media kinds each serves: SERVED_KINDS


class Orchestrator:
    """Request → prompt → (encode each kind present, concurrently) → prefill → decode. Text-only requests skip
    the encoders."""

    def __init__(self, settings: Settings, encode: EncodeCall, prefill: PrefillCall):
        self.planner = RequestPlanner(settings)
        self.encode, self.prefill = encode, prefill

    async def run(self, request: GenerateRequest, decode: DecodeCall) -> None:
        """``decode`` streams the answer to this request's client."""
        prefill_request, media = self.planner.plan(request)
        work = [(encoder, items) for encoder in ENCODED_KINDS if (items := encoder_items(encoder, media))]
        if work:
            options = request.sampling.media_io_kwargs
            encoded = await asyncio.gather(*(self.encode(encoder, items, options) for encoder, items in work))
            prefill_request.embeddings = [d for descriptors in encoded for d in descriptors]
        result = await self.prefill(prefill_request)
        await decode(decode_request_for(prefill_request, result))
