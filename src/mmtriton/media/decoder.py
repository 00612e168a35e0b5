"""Decoding by modality: bytes → a decoded value, one :class:`MediaDecoder` per modality (image.py, audio.py).

The loader is generic over decoders; a new modality (video, say) is one new file with one decoder class, and a
``load_<kind>`` on :class:`~mmtriton.media.loader.MediaLoader` that builds it.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

T = TypeVar("T")


class MediaDecoder(Protocol[T]):
    """Bytes of one modality → value. Instances carry their parameters (limits, target rate), so two decoders
    whose outputs differ must give different :meth:`cache_key` for the same source."""

    @property
    def kind(self) -> str:
        """The modality: "image", "audio", … (a ``data:`` URI's MIME major type must be this)."""
        ...

    def cache_key(self, source_key: str) -> str:
        """The cache key of this decoding of the bytes named by ``source_key`` ("url:…" / "data-sha256:…" /
        "sha256:…")."""
        ...

    def decode(self, data: bytes, where: str) -> T:
        """Blocking (the loader runs it in a worker thread); refusals raise InvalidInput naming ``where``."""
        ...

    def nbytes(self, value: T) -> int:
        """What ``value`` costs in the byte-bounded cache."""
        ...
