"""The public request/response contract (docs/contract.md) as plain Python: parsing and validation.

Knows nothing of Triton or vLLM: inputs arrive as a mapping of name → numpy array (or None when a client
left an optional input out), and every problem raises :class:`InvalidInput` naming what was wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mmtriton.settings import Settings


class InvalidInput(ValueError):
    """A client error: answered as INVALID_ARG (HTTP 400) with this message; the server keeps serving."""


# Triton 2.51 drops a response's error code on its way back through a BLS call (it arrives as INTERNAL), and a
# gRPC stream carries only the text, so the class of our errors also travels in their text: callers (BLS, the
# OpenAI server) recover it with error_class().
CLIENT_ERROR_PREFIX = "invalid input: "
UNAVAILABLE_PREFIX = "unavailable: "


def error_class(message: str) -> tuple[str, str]:
    """("invalid_input" | "unavailable" | "internal", the message without its prefix). The prefix may follow
    text that Triton puts in front (an ensemble names its step)."""
    for kind, prefix in (("invalid_input", CLIENT_ERROR_PREFIX), ("unavailable", UNAVAILABLE_PREFIX)):
        at = message.find(prefix)
        if at >= 0:
            return kind, message[at + len(prefix):]
    return "internal", message


# Inputs of multimodal, multimodal_bls and multimodal_agg.
INPUTS: list[dict[str, Any]] = [
    {"name": "text_input", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
    {"name": "messages", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
    {"name": "image_url", "data_type": "TYPE_STRING", "dims": [-1], "optional": True},
    {"name": "audio_url", "data_type": "TYPE_STRING", "dims": [-1], "optional": True},
    {"name": "video_url", "data_type": "TYPE_STRING", "dims": [-1], "optional": True},
    {"name": "sampling_parameters", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
    {"name": "stream", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
]
OUTPUTS: list[dict[str, Any]] = [
    {"name": "text_output", "data_type": "TYPE_STRING", "dims": [-1]},
    {"name": "token_ids", "data_type": "TYPE_INT64", "dims": [-1]},
    {"name": "finish_reason", "data_type": "TYPE_STRING", "dims": [1]},
    {"name": "num_input_tokens", "data_type": "TYPE_UINT32", "dims": [1]},
    {"name": "num_output_tokens", "data_type": "TYPE_UINT32", "dims": [1]},
]

MEDIA_KINDS = ("image", "audio", "video")


class VideoOptions(BaseModel):
    """How one request samples frames from its videos (``media_io_kwargs.video``, vLLM's name). Both None: the
    settings' defaults (MMT_VIDEO_FPS, MMT_VIDEO_NUM_FRAMES); both set: refused (which one would win?).

    Defined here, not in media/video.py (which re-exports it), because media imports this module."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Sample this many frames evenly over the stream (at most MMT_VIDEO_MAX_FRAMES).
    num_frames: int | None = Field(default=None, ge=1)
    # Or sample at this rate: frames per second of video.
    fps: float | None = Field(default=None, gt=0.0, le=1000.0)


class MediaIOKwargs(BaseModel):
    """``sampling_parameters.media_io_kwargs``: per-modality decoding options, as vLLM's ``media_io_kwargs``
    (``{"video": {"num_frames": 8}}``). Only video has options; another key is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    video: VideoOptions | None = None


class SamplingOptions(BaseModel):
    """``sampling_parameters`` JSON. Unknown keys are refused, so a typo never silently does nothing."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(default=16, ge=1)
    min_tokens: int = Field(default=0, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    # Generate max_tokens whatever the model says (benchmarks want fixed output lengths).
    ignore_eos: bool = False
    # How media are decoded (frames sampled from videos); not a vLLM SamplingParams field.
    media_io_kwargs: MediaIOKwargs | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


@dataclass(frozen=True)
class MediaItem:
    kind: str  # "image" | "audio" | "video"
    url: str
    # Where the item came from, for error messages: "image_url[1]" or "messages[0].content[2]".
    where: str


@dataclass
class GenerateRequest:
    # OpenAI-style messages (list of {"role", "content"}) with media parts in order.
    messages: list[dict[str, Any]]
    media: list[MediaItem]
    sampling: SamplingOptions
    stream: bool = False


def _json(raw: str, name: str) -> Any:
    """JSON from a client. Besides syntax errors, json.loads raises a plain ValueError for an integer of more
    than 4300 digits and RecursionError for deep nesting (found by bench/fuzz.py): all the client's input."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{name} is not valid JSON: {exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"{name} is not acceptable JSON: {type(exc).__name__}: {str(exc)[:120]}") from exc


def parse_sampling_parameters(raw: str | None, settings: Settings) -> SamplingOptions:
    if raw is None or not raw.strip():
        return SamplingOptions()
    data = _json(raw, "sampling_parameters")
    if not isinstance(data, dict):
        raise InvalidInput("sampling_parameters must be a JSON object")
    try:
        options = SamplingOptions.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"sampling_parameters: {_pydantic_message(exc)}") from exc
    if options.max_tokens > settings.max_tokens_limit:
        raise InvalidInput(f"sampling_parameters.max_tokens={options.max_tokens} exceeds {settings.max_tokens_limit}")
    if options.min_tokens > options.max_tokens:
        raise InvalidInput("sampling_parameters.min_tokens must not exceed max_tokens")
    video = options.media_io_kwargs.video if options.media_io_kwargs is not None else None
    if video is not None:
        check_video_options(video, settings, "sampling_parameters.media_io_kwargs.video")
    return options


def check_video_options(options: VideoOptions, settings: Settings, where: str) -> None:
    """Refuse what no video could be sampled by: both num_frames and fps, or more frames than the limit."""
    if options.num_frames is not None and options.fps is not None:
        raise InvalidInput(f"{where}: set num_frames or fps, not both")
    if options.num_frames is not None and options.num_frames > settings.video_max_frames:
        raise InvalidInput(
            f"{where}.num_frames={options.num_frames} exceeds the limit of {settings.video_max_frames} frames "
            "(MMT_VIDEO_MAX_FRAMES)"
        )


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "value"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def input_strings(array: np.ndarray | None, name: str) -> list[str]:
    if array is None:
        return []
    out = []
    for i, v in enumerate(np.asarray(array).reshape(-1)):
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInput(f"{name}[{i}] is not valid UTF-8") from exc
        out.append(str(v))
    return out


def input_string(array: np.ndarray | None, name: str) -> str | None:
    values = input_strings(array, name)
    if not values:
        return None
    if len(values) != 1:
        raise InvalidInput(f"{name} must hold exactly one string, got {len(values)}")
    return values[0]


def _parse_messages(raw: str) -> tuple[list[dict[str, Any]], list[MediaItem]]:
    """OpenAI chat messages → template-ready messages (media parts typed) + media items in order."""
    data = _json(raw, "messages")
    if not isinstance(data, list) or not data:
        raise InvalidInput("messages must be a non-empty JSON array of {role, content} objects")
    messages: list[dict[str, Any]] = []
    media: list[MediaItem] = []
    for i, msg in enumerate(data):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise InvalidInput(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role not in ("system", "user", "assistant"):
            raise InvalidInput(f"messages[{i}].role {role!r} is not one of system, user, assistant")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InvalidInput(f"messages[{i}].content must be a string or an array of parts")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            parts.append(_parse_part(part, where, media))
        messages.append({"role": role, "content": parts})
    return messages, media


def _parse_part(part: Any, where: str, media: list[MediaItem]) -> dict[str, Any]:
    if not isinstance(part, dict) or "type" not in part:
        raise InvalidInput(f"{where} must be an object with a 'type'")
    kind = part["type"]
    if not isinstance(kind, str):
        raise InvalidInput(f"{where}.type must be a string, got {type(kind).__name__}")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise InvalidInput(f"{where}.text must be a string")
        return {"type": "text", "text": part["text"]}
    url_parts = {"image_url": "image", "audio_url": "audio", "video_url": "video"}
    if kind in url_parts:
        value = part.get(kind)
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url:
            raise InvalidInput(f"{where}.{kind}.url must be a non-empty string")
        media.append(MediaItem(url_parts[kind], url, where))
        return {"type": url_parts[kind]}
    if kind == "input_audio":
        value = part.get("input_audio")
        if not isinstance(value, dict) or not isinstance(value.get("data"), str):
            raise InvalidInput(f"{where}.input_audio must be {{'data': base64, 'format': 'wav'|'mp3'|...}}")
        fmt = str(value.get("format", "wav"))
        media.append(MediaItem("audio", f"data:audio/{fmt};base64,{value['data']}", where))
        return {"type": "audio"}
    raise InvalidInput(f"{where}.type {kind!r} is not one of text, image_url, input_audio, audio_url, video_url")


def parse_request(inputs: Mapping[str, np.ndarray | None], settings: Settings) -> GenerateRequest:
    """Triton input tensors (name → array or None) → a validated :class:`GenerateRequest`."""
    raw_sampling = input_string(inputs.get("sampling_parameters"), "sampling_parameters")
    sampling = parse_sampling_parameters(raw_sampling, settings)
    stream_arr = inputs.get("stream")
    stream = bool(np.asarray(stream_arr).reshape(-1)[0]) if stream_arr is not None and np.size(stream_arr) else False

    raw_messages = input_string(inputs.get("messages"), "messages")
    if raw_messages is not None and raw_messages.strip():
        messages, media = _parse_messages(raw_messages)
    else:
        text = input_string(inputs.get("text_input"), "text_input")
        if text is None:
            raise InvalidInput("request needs 'text_input' or 'messages'")
        media = []
        parts: list[dict[str, Any]] = []
        # Media first, then the text: the order Qwen and LLaVA chat templates are trained on.
        for kind in MEDIA_KINDS:
            for k, url in enumerate(input_strings(inputs.get(f"{kind}_url"), f"{kind}_url")):
                if not url:
                    raise InvalidInput(f"{kind}_url[{k}] is empty")
                media.append(MediaItem(kind, url, f"{kind}_url[{k}]"))
                parts.append({"type": kind})
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": text}] if parts else text}]
    # With messages, the *_url tensors add nothing: refuse the ambiguity instead of guessing an order.
    if raw_messages is not None and raw_messages.strip():
        for kind in MEDIA_KINDS:
            if input_strings(inputs.get(f"{kind}_url"), f"{kind}_url"):
                raise InvalidInput(f"send media either in messages or in {kind}_url, not both")

    if len(media) > settings.max_media_items:
        raise InvalidInput(f"too many media items: {len(media)} > {settings.max_media_items}")
    return GenerateRequest(messages=messages, media=media, sampling=sampling, stream=stream)
