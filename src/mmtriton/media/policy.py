"""MediaPolicy: the few settings the media layer reads, built once from Settings."""

from __future__ import annotations

from dataclasses import dataclass

from mmtriton.settings import Settings


@dataclass(frozen=True)
class MediaPolicy:
    """What may be fetched from where, how much of it, and how long it may take. Immutable: share it freely."""

    # URL policy (http/https): loopback / private targets refused unless allowed; metadata endpoints always are.
    allow_loopback: bool
    allow_private: bool
    # Directories file:// URLs may read from; empty = file:// refused.
    allowed_local_dirs: tuple[str, ...]
    # Limits: bytes of one item however it arrives, pixels of an image, seconds of audio.
    max_bytes: int
    max_image_pixels: int
    max_audio_seconds: float
    # Whole fetch (DNS + every redirect hop + body); each DNS lookup / TCP connect; redirect hops followed.
    fetch_timeout_s: float
    connect_timeout_s: float
    max_redirects: int

    @classmethod
    def from_settings(cls, settings: Settings) -> MediaPolicy:
        return cls(
            allow_loopback=settings.allow_loopback_media_urls,
            allow_private=settings.allow_private_media_urls,
            allowed_local_dirs=tuple(settings.allowed_local_media_dirs),
            max_bytes=settings.max_media_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_audio_seconds=settings.max_audio_seconds,
            fetch_timeout_s=settings.media_fetch_timeout_s,
            connect_timeout_s=settings.media_connect_timeout_s,
            max_redirects=settings.media_max_redirects,
        )


def as_policy(policy_or_settings: MediaPolicy | Settings) -> MediaPolicy:
    """For the compatibility entry points (media/http.py, media/fetch.py) that older callers pass Settings to."""
    if isinstance(policy_or_settings, MediaPolicy):
        return policy_or_settings
    return MediaPolicy.from_settings(policy_or_settings)
