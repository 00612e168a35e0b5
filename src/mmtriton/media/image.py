"""Image bytes → RGB PIL image, with a format allow-list and a pixel limit checked before decoding."""

from __future__ import annotations

import functools
import io
import struct
import warnings
from dataclasses import dataclass
from typing import ClassVar

from PIL import Image

from mmtriton.protocol import InvalidInput

# PIL format names we decode; anything else (TIFF, BMP, GIF, PSD, …) is refused by name.
ALLOWED_IMAGE_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
# Passed to Image.open: only these plugins ever parse untrusted bytes.
_OPEN_FORMATS = tuple(sorted(ALLOWED_IMAGE_FORMATS))
# Bytes Image.open reads to pick a plugin; the magic-number checks below look at no more.
_PREFIX_BYTES = 16


def decode_image(data: bytes, where: str, max_pixels: int) -> Image.Image:
    """Decode ``data``; ``where`` names the item in errors (e.g. ``image_url[0]``)."""
    if not data:
        raise InvalidInput(f"{where}: image is empty")
    try:
        with warnings.catch_warnings():
            # PIL's own bomb check warns or raises by its limit; ours below is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"{where}: image is too large: over {max_pixels} pixels ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        other = _refused_format_name(data[:_PREFIX_BYTES])
        if other is not None:
            raise _format_refusal(where, other) from exc
        raise InvalidInput(f"{where}: cannot identify image data ({type(exc).__name__})") from exc
    except Exception as exc:  # PIL raises many types for garbage input
        raise InvalidInput(f"{where}: cannot identify image data ({type(exc).__name__})") from exc
    if img.format not in ALLOWED_IMAGE_FORMATS:  # cannot happen with formats= above; kept as the rule itself
        raise _format_refusal(where, img.format)
    width, height = img.size
    # Header only so far: refuse decompression bombs before any pixel is decoded.
    if width * height > max_pixels:
        raise InvalidInput(
            f"{where}: image is too large: {width}x{height} = {width * height} pixels, limit is {max_pixels}"
        )
    try:
        img.load()
    except Exception as exc:
        raise InvalidInput(f"{where}: image data is truncated or corrupt ({exc})") from exc
    return img.convert("RGB") if img.mode != "RGB" else img


def _format_refusal(where: str, name: str | None) -> InvalidInput:
    return InvalidInput(
        f"{where}: image format {name or 'unknown'} is not allowed "
        f"(allowed: {', '.join(sorted(ALLOWED_IMAGE_FORMATS))})"
    )


@functools.cache
def _all_plugins_loaded() -> None:
    Image.init()  # imports every plugin module: code only, it parses nothing


def _refused_format_name(prefix: bytes) -> str | None:
    """The name of the first other PIL format whose magic number ``prefix`` matches, to say what was refused.

    Only the plugins' ``accept`` checks run (byte comparisons on the first 16 bytes); no other plugin opens or
    parses the data.
    """
    _all_plugins_loaded()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if name in ALLOWED_IMAGE_FORMATS or accept is None:
            continue
        try:
            if accept(prefix) is True:
                return name
        except (IndexError, TypeError, ValueError, struct.error):  # a prefix too short for its check
            continue
    return None


def image_nbytes(img: Image.Image) -> int:
    """Cache cost of a decoded RGB image."""
    width, height = img.size
    return width * height * 3


@dataclass(frozen=True)
class ImageDecoder:
    """MediaDecoder for images: RGB, within ``max_pixels``."""

    max_pixels: int
    kind: ClassVar[str] = "image"

    def cache_key(self, source_key: str) -> str:
        # The bare source key, as before: one pixel limit per loader, so nothing else to tell apart.
        return source_key

    def decode(self, data: bytes, where: str) -> Image.Image:
        return decode_image(data, where, self.max_pixels)

    def nbytes(self, value: Image.Image) -> int:
        return image_nbytes(value)
