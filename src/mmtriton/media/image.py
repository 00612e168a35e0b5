"""Image bytes → RGB PIL image, with a format allow-list and a pixel limit checked before decoding."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from mmtriton.protocol import InvalidInput

# PIL format names we decode; anything else (TIFF, BMP, GIF, PSD, …) is refused by name.
ALLOWED_IMAGE_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})


def decode_image(data: bytes, where: str, max_pixels: int) -> Image.Image:
    """Decode ``data``; ``where`` names the item in errors (e.g. ``image_url[0]``)."""
    if not data:
        raise InvalidInput(f"{where}: image is empty")
    try:
        with warnings.catch_warnings():
            # PIL's own bomb check warns or raises by its limit; ours below is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=None)
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"{where}: image is too large: over {max_pixels} pixels ({exc})") from exc
    except Exception as exc:  # PIL raises many types for garbage input
        raise InvalidInput(f"{where}: cannot identify image data ({type(exc).__name__})") from exc
    if img.format not in ALLOWED_IMAGE_FORMATS:
        raise InvalidInput(
            f"{where}: image format {img.format or 'unknown'} is not allowed "
            f"(allowed: {', '.join(sorted(ALLOWED_IMAGE_FORMATS))})"
        )
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
