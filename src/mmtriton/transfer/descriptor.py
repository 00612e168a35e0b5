"""What travels with a request: the JSON-able :class:`EmbeddingDescriptor` and the dtypes that may travel."""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

# dtypes that may travel; names are torch's without the "torch." prefix.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
DESCRIPTOR_VERSION = 1


def _fail(msg: str) -> None:
    raise ValueError(f"invalid embedding descriptor: {msg}")


def _is_int(x: Any) -> bool:
    # bool is an int subclass; a JSON `true` is not a size.
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class EmbeddingDescriptor:
    """Everything a receiver needs to READ one embedding from a sender's pool.

    ``agent_metadata`` is the sender's full NIXL agent metadata, base64: small (~600 chars), and carrying it
    in-band avoids NIXL's listener (a socket on 0.0.0.0) and a metadata round trip; the receiver loads it only
    the first time it sees that sender, or again when it changes (the sender restarted).
    """

    transfer_id: str
    agent: str
    agent_metadata: str
    addr: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = DESCRIPTOR_VERSION

    def validate(self) -> None:
        """Self-consistency checks; raises ValueError naming the bad field."""
        if not isinstance(self.transfer_id, str) or not self.transfer_id:
            _fail("transfer_id must be a non-empty string")
        if not isinstance(self.agent, str) or not self.agent:
            _fail("agent must be a non-empty string")
        if not isinstance(self.agent_metadata, str) or not self.agent_metadata:
            _fail("agent_metadata must be a non-empty base64 string")
        if not _is_int(self.addr) or self.addr < 0:
            _fail(f"addr must be a non-negative integer, got {self.addr!r}")
        if not _is_int(self.nbytes) or self.nbytes < 0:
            _fail(f"nbytes must be a non-negative integer, got {self.nbytes!r}")
        if not isinstance(self.shape, tuple) or not all(_is_int(d) and d >= 0 for d in self.shape):
            _fail(f"shape must be a list of non-negative integers, got {self.shape!r}")
        if self.dtype not in DTYPES:
            _fail(f"unknown dtype {self.dtype!r} (known: {', '.join(DTYPES)})")
        if not isinstance(self.extra, dict):
            _fail(f"extra must be an object, got {type(self.extra).__name__}")
        if self.version != DESCRIPTOR_VERSION:
            _fail(f"unsupported version {self.version!r} (this build reads {DESCRIPTOR_VERSION})")
        expected = math.prod(self.shape) * DTYPES[self.dtype].itemsize
        if self.nbytes != expected:
            _fail(f"nbytes {self.nbytes} != prod(shape {list(self.shape)}) * itemsize of {self.dtype} = {expected}")

    def metadata_bytes(self) -> bytes:
        try:
            return base64.b64decode(self.agent_metadata, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"invalid embedding descriptor: agent_metadata is not valid base64 ({e})") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EmbeddingDescriptor:
        if not isinstance(d, Mapping):
            _fail(f"expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        required = {"transfer_id", "agent", "agent_metadata", "addr", "nbytes", "shape", "dtype"}
        missing = sorted(required - d.keys())
        if missing:
            _fail(f"missing field(s) {', '.join(missing)}")
        unknown = sorted(set(d) - names)
        if unknown:
            _fail(f"unknown field(s) {', '.join(unknown)}")
        shape = d["shape"]
        if not isinstance(shape, list | tuple):
            _fail(f"shape must be a list of non-negative integers, got {shape!r}")
        desc = cls(**{**d, "shape": tuple(shape), "extra": d.get("extra", {})})
        desc.validate()
        desc.metadata_bytes()
        return desc

    @classmethod
    def from_json(cls, text: str | bytes) -> EmbeddingDescriptor:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise ValueError(f"invalid embedding descriptor: not JSON ({e})") from None
        return cls.from_dict(d)
