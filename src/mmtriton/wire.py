"""The stage wire: typed messages between the pipeline's own models (encoder → prefill → decode), and their
integrity check.

These travel as JSON in TYPE_STRING tensors. Each model parses what it receives once, at its edge, into these
types; the pipeline code passes the types on. Embeddings themselves travel by NIXL
(:class:`mmtriton.transfer.EmbeddingDescriptor`, one JSON string per item, parsed once by prefill); what prefill
and decode need of an item besides its values is a :class:`MediaLayout`.

They are internal: ``kv_transfer_params`` in particular must only ever come from our own prefill (a forged one
can kill the decode engine), so prefill signs what it hands to decode with a secret shared by the server's
models, and decode refuses anything unsigned or altered.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmtriton.protocol import InvalidInput, SamplingOptions
from mmtriton.settings import cache_dir

MediaKind = Literal["image", "audio", "video"]


class MediaPlacement(BaseModel):
    """What an encoder says of one item besides its values (it rides in the embedding descriptor's ``extra``):
    its kind, and the per-modality fields vLLM needs to place it."""

    model_config = ConfigDict(extra="forbid")
    kind: MediaKind
    # Qwen2-VL images and videos: the [t, h, w] patch grid (M-RoPE positions). None for audio.
    grid_thw: tuple[int, int, int] | None = None


class MediaLayout(MediaPlacement):
    """What prefill and decode need of one media item: placement and shape, no data. Decode rebuilds the
    prompt's positions from it (Qwen2-VL M-RoPE) and gets the values' effect through prefill's KV."""

    num_tokens: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    dtype: str = "float32"


def parse_placement(extra: dict[str, Any], what: str) -> MediaPlacement:
    try:
        return MediaPlacement.model_validate(extra)
    except ValidationError as exc:
        raise InvalidInput(f"{what}: {exc.errors()[0]['msg']} ({exc.errors()[0]['loc']})") from exc


class PrefillRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    # EmbeddingDescriptor JSON strings from the encoders, in prompt order within each kind (parsed by prefill).
    embeddings: list[str] = Field(default_factory=list)
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)
    # Carried through to the decode request prefill hands on (the ensemble has no other way to pass it).
    stream: bool = False


# kv_transfer_params key: how many tokens at the end of decode's prompt prefill did not compute (the first token,
# which prefill sampled); mmtriton.kv_connector loads KV for the tokens before them only.
TOKENS_AFTER_PREFILL = "mmtriton_tokens_after_prefill"


class FirstToken(BaseModel):
    """The token prefill sampled: sent to the client at once (by llm_decode, or by multimodal_bls before it calls
    llm_decode), and decode goes on from it (disagg.first_token_of says when prefill hands it over).

    Prefill also works out, while its engine computes, what decode would otherwise do before it could send this
    token: the prompt's token ids as vLLM tokenizes the text prompt (media placeholders unexpanded), and this token's
    text as a detokenizer primed with those ids prints it ("" when it is one byte of a character)."""

    model_config = ConfigDict(extra="forbid")
    token_id: int = Field(ge=0)
    text: str
    prompt_token_ids: list[int] = Field(min_length=1)


class PrefillResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kv_transfer_params: dict[str, Any]
    num_input_tokens: int
    media: list[MediaLayout] = Field(default_factory=list)
    # None: decode computes the first token itself (after the KV has arrived).
    first_token: FirstToken | None = None
    signature: str = ""


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    prefill: PrefillResult
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)
    stream: bool = False
    # Set by the BLS model, so it can cancel this decode (DecodeCancel) when its client goes: Triton 2.51's BLS
    # has no way to cancel a request it made. Empty from the ensemble: there llm_decode uses the Triton request's
    # id, which the ensemble copies from the client's request.
    request_id: str = ""
    # The caller (multimodal_bls) has already sent prefill's first token to the client: llm_decode goes on from it
    # without sending it again.
    first_token_sent: bool = False


class DecodeCancel(BaseModel):
    """BLS or the OpenAI server → llm_decode: stop the decode with this ``request_id`` (its client cancelled)."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1)


def parse_stage(model: type[BaseModel], raw: str | bytes, what: str):
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidInput(f"{what}: malformed ({exc.error_count()} errors: {exc.errors()[0]['msg']})") from exc


def pipeline_secret() -> bytes:
    """The key prefill signs with and decode checks with: MMT_PIPELINE_SECRET, else a 0600 file made once."""
    if os.environ.get("MMT_PIPELINE_SECRET"):
        return os.environ["MMT_PIPELINE_SECRET"].encode()
    path = Path(cache_dir()) / "pipeline.secret"
    if not path.exists():
        # Several stubs may get here at once: write aside, then link into place (atomic, first one wins).
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".pipeline.secret.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip().encode()


def _digest(result: PrefillResult, key: bytes) -> str:
    body = json.dumps(result.model_dump(exclude={"signature"}), sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def sign(result: PrefillResult, key: bytes) -> PrefillResult:
    return result.model_copy(update={"signature": _digest(result, key)})


def verify(result: PrefillResult, key: bytes) -> None:
    if not result.signature or not hmac.compare_digest(result.signature, _digest(result, key)):
        raise InvalidInput("prefill result is not signed by this server's prefill: refused")
