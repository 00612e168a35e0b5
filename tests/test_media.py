"""Media loading: data: URIs, the file:// allow-list, the scheme registry, image and audio decoding with limits."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import pattern_image, png_bytes, tone, wav_bytes
from mmtriton.media.audio import decode_audio
from mmtriton.media.image import decode_image
from mmtriton.media.policy import MediaPolicy
from mmtriton.media.transport import read_data_uri, read_local_bytes
from mmtriton.protocol import InvalidInput
from mmtriton.settings import Settings


def encoded(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_allowed_formats_decode_to_rgb(fmt):
    img = decode_image(encoded(pattern_image(40, 30, 0), fmt), "image_url[0]", max_pixels=10_000)
    assert img.mode == "RGB" and img.size == (40, 30)


def test_png_round_trip_is_lossless():
    src = pattern_image(40, 30, 0)
    assert np.array_equal(np.asarray(decode_image(png_bytes(src), "x", 10_000)), np.asarray(src))


def test_rgba_and_grayscale_become_rgb():
    for mode in ("RGBA", "L", "P"):
        img = decode_image(png_bytes(pattern_image(20, 20, 0).convert(mode)), "x", 10_000)
        assert img.mode == "RGB"


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused_by_name(fmt):
    with pytest.raises(InvalidInput, match=f"image_url\\[2\\]: image format {fmt} is not allowed"):
        decode_image(encoded(pattern_image(20, 20, 0), fmt), "image_url[2]", 10_000)


def test_no_other_plugin_parses_the_bytes(monkeypatch):
    # Every plugin's opener records being called: only the allowed formats' may run on untrusted bytes, even when
    # the bytes are another format's (refused by its magic number alone) or garbage.
    Image.init()
    opened: list[str] = []

    def recording(name: str, factory):
        def open_as(*args, **kwargs):
            opened.append(name)
            return factory(*args, **kwargs)
        return open_as

    for name, (factory, accept) in list(Image.OPEN.items()):
        monkeypatch.setitem(Image.OPEN, name, (recording(name, factory), accept))
    for fmt in ("GIF", "BMP", "TIFF", "ICO", "PPM"):
        with pytest.raises(InvalidInput, match=f"image format {fmt} is not allowed"):
            decode_image(encoded(pattern_image(20, 20, 0), fmt), "image_url[0]", 10_000)
    with pytest.raises(InvalidInput, match="cannot identify image data"):
        decode_image(b"definitely not an image", "image_url[0]", 10_000)
    assert opened == []
    decode_image(png_bytes(pattern_image(8, 8, 0)), "x", 100)
    assert opened == ["PNG"]


def test_garbage_and_truncated_images():
    with pytest.raises(InvalidInput, match="cannot identify image data"):
        decode_image(b"definitely not an image", "image_url[0]", 10_000)
    data = encoded(pattern_image(64, 64, 0), "JPEG")
    with pytest.raises(InvalidInput, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], "image_url[0]", 10_000)
    with pytest.raises(InvalidInput, match="empty"):
        decode_image(b"", "image_url[0]", 10_000)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height: the check must refuse it from the header, before decoding."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_pixel_limit_is_checked_before_decoding():
    # Past PIL's own bomb limit, PIL refuses at open; below it, our limit refuses from the header.
    with pytest.raises(InvalidInput, match=r"image_url\[0\]: image is too large: over 16777216 pixels"):
        decode_image(png_header_only(50_000, 50_000), "image_url[0]", max_pixels=4096 * 4096)
    with pytest.raises(InvalidInput, match=r"image_url\[0\]: image is too large: 5000x5000 = 25000000 pixels"):
        decode_image(png_header_only(5000, 5000), "image_url[0]", max_pixels=4096 * 4096)
    with pytest.raises(InvalidInput, match="limit is 100"):
        decode_image(png_bytes(pattern_image(20, 20, 0)), "x", max_pixels=100)


def test_data_uri_parsing():
    payload = base64.b64encode(b"abc").decode()
    assert read_data_uri(f"data:image/png;base64,{payload}", "w", "image", 100) == b"abc"
    cases = [
        ("data:image/png;base64", "no ','"),
        (f"data:text/plain;base64,{payload}", "is not image/*"),
        ("data:image/png,abc", "must be base64"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png;base64," + "A" * 400, "larger than 100 bytes"),
    ]
    for url, message in cases:
        with pytest.raises(InvalidInput, match=message):
            read_data_uri(url, "w", "image", 100)


def policy(**settings: object) -> MediaPolicy:
    return MediaPolicy.from_settings(Settings(**settings))


def test_file_urls_only_under_allowed_dirs(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "a.png").write_bytes(b"png")
    (outside / "secret.png").write_bytes(b"secret")
    (allowed / "link.png").symlink_to(outside / "secret.png")

    with pytest.raises(InvalidInput, match="file:// URLs are disabled"):
        read_local_bytes(f"file://{allowed / 'a.png'}", "image_url[0]", "image", policy())
    s = policy(allowed_local_media_dirs=(str(allowed),))
    assert read_local_bytes(f"file://{allowed / 'a.png'}", "w", "image", s) == b"png"
    for url in (f"file://{outside / 'secret.png'}", f"file://{allowed / '..' / 'outside' / 'secret.png'}",
                f"file://{allowed / 'link.png'}"):
        with pytest.raises(InvalidInput, match="not under an allowed media directory"):
            read_local_bytes(url, "w", "image", s)
    with pytest.raises(InvalidInput, match="does not exist"):
        read_local_bytes(f"file://{allowed / 'missing.png'}", "w", "image", s)
    with pytest.raises(InvalidInput, match="must not name a host"):
        read_local_bytes(f"file://example/{allowed / 'a.png'}", "w", "image", s)


def test_hostile_file_urls_are_client_errors(tmp_path):
    # Found by bench/fuzz.py: these escaped as ValueError / OSError (a 500) before.
    s = policy(allowed_local_media_dirs=(str(tmp_path),))
    for url, message in [("file://[/x", "file:// URL is not valid"),
                         (f"file://{tmp_path}/%00", "contains a NUL byte"),
                         (f"file://{tmp_path}/{'a' * 300}", "cannot be read")]:
        with pytest.raises(InvalidInput, match=rf"^image_url\[0\]: .*{message}"):
            read_local_bytes(url, "image_url[0]", "image", s)


@pytest.mark.parametrize("url, message", [
    ("ftp://x/a.png", "unsupported URL scheme 'ftp'"),
    ("a.png", "unsupported URL scheme"),
])
def test_other_schemes(url, message):
    with pytest.raises(InvalidInput, match=message):
        read_local_bytes(url, "w", "image", policy())


def test_blocking_read_refuses_remote_urls():
    # http(s) is fetched on an event loop only (MediaLoader, tests/test_media_http.py): never a blocking fetch.
    with pytest.raises(RuntimeError, match="fetched asynchronously"):
        read_local_bytes("http://127.0.0.1:9/a.png", "w", "image", policy(allow_loopback_media_urls=True))


def test_audio_wav_resampled_to_model_rate():
    wave = decode_audio(wav_bytes(tone(0.5, 8000), 8000), "audio_url[0]", 16000, max_seconds=10)
    assert wave.dtype == np.float32 and abs(wave.size - 8000) <= 2
    assert 0.3 < float(np.abs(wave).max()) < 0.7


def test_audio_other_codecs_via_pyav():
    import av

    buf = io.BytesIO()
    # AAC in ADTS: libsndfile cannot read it, so this goes through the PyAV fallback.
    with av.open(buf, "w", format="adts") as out:
        stream = out.add_stream("aac", rate=16000, layout="mono")
        samples = tone(0.5)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    wave = decode_audio(buf.getvalue(), "a", 16000, max_seconds=10)
    # AAC adds a 1024-sample priming frame and pads to its 1024-sample frames.
    assert 8000 <= wave.size <= 8000 + 2 * 1024 and float(np.abs(wave).max()) > 0.2


def test_bad_audio():
    with pytest.raises(InvalidInput, match=r"audio_url\[1\]: cannot decode audio"):
        decode_audio(b"not audio at all" * 10, "audio_url[1]", 16000, 10)
    with pytest.raises(InvalidInput, match="limit is 1 s"):
        decode_audio(wav_bytes(tone(2.0), 16000), "a", 16000, max_seconds=1)


def test_image_from_pil_module_is_pil():
    assert isinstance(decode_image(png_bytes(pattern_image(8, 8, 0)), "x", 100), Image.Image)
