"""OpenAI chat-completions wire format ↔ our Triton public contract, as plain Python (no server, no Triton).

A request becomes the contract's inputs (``messages`` JSON, ``sampling_parameters`` JSON, ``stream``); the Triton
responses become a ``chat.completion`` or ``chat.completion.chunk`` objects. Content parts are checked by the
Triton model itself (it names the bad item), so a client gets the same message through both front doors.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class OpenAIError(Exception):
    """Answered as OpenAI's error JSON with this HTTP status."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
             503: "service_unavailable", 504: "timeout"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "internal_error"),
                          "param": self.param, "code": self.status}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Fields we do not know are ignored (as OpenAI-compatible servers do); ones we know but cannot honour are
    # refused by unsupported(), so nothing asked for is silently dropped.
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    # vLLM's extensions, with vLLM's names.
    top_k: int | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    return_token_ids: bool = False
    # vLLM's per-modality decoding options ({"video": {"num_frames": 8}}), checked by the Triton model.
    media_io_kwargs: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        if self.n != 1:
            return "n: only 1 choice per request is supported"
        if self.logprobs:
            return "logprobs are not supported"
        if self.tools:
            return "tools are not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format: only 'text' is supported"
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                return f"{name} is not supported"
        return None

    def sampling_parameters(self, default_max_tokens: int) -> dict[str, Any]:
        """The contract's ``sampling_parameters`` (validated again, with limits, by the Triton model)."""
        out: dict[str, Any] = {"max_tokens": self.max_completion_tokens or self.max_tokens or default_max_tokens}
        for name in ("temperature", "top_p", "seed", "top_k", "min_tokens", "ignore_eos"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.media_io_kwargs is not None:
            out["media_io_kwargs"] = self.media_io_kwargs
        if self.stop:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        return out

    def triton_inputs(self, default_max_tokens: int) -> dict[str, np.ndarray]:
        """Always streamed from Triton, whole answers too (the gateway gathers them). One final response was
        ~19 ms faster for 24 tokens, but while Triton sent nothing a client's disconnect reached the model late:
        in 3 of 6 fresh-clone CI runs every try of the whole-answer disconnect test was late; streamed, none were."""
        return {
            "messages": np.array([json.dumps(self.messages).encode()], dtype=np.object_),
            "sampling_parameters": np.array([json.dumps(self.sampling_parameters(default_max_tokens)).encode()],
                                            dtype=np.object_),
            "stream": np.array([True], dtype=bool),
        }


@dataclass
class Delta:
    """One Triton response of the contract."""

    text: str
    token_ids: list[int]
    finish_reason: str
    num_input_tokens: int
    num_output_tokens: int


@dataclass
class Completion:
    """Builds the OpenAI objects for one request from its Triton deltas."""

    model: str
    return_token_ids: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, delta: Delta) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        self.finish_reason = delta.finish_reason or None
        self.prompt_tokens = delta.num_input_tokens
        self.completion_tokens = delta.num_output_tokens

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def response(self) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": "".join(self.text)},
                                  "logprobs": None, "finish_reason": self.finish_reason}
        if self.return_token_ids:
            choice["token_ids"] = self.token_ids
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage()}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None,
              token_ids: list[int] | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if self.return_token_ids and token_ids is not None:
            choice["token_ids"] = token_ids
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}

    def first_chunk(self) -> dict[str, Any]:
        return self.chunk({"role": "assistant", "content": ""})

    def delta_chunk(self, delta: Delta) -> dict[str, Any]:
        return self.chunk({"content": delta.text}, delta.finish_reason or None, delta.token_ids)

    def usage_chunk(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}


def sse(data: dict[str, Any] | Literal["[DONE]"]) -> bytes:
    """One Server-Sent Event."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
