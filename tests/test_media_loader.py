"""MediaLoader as two axes: transport by URL scheme × decoding by modality; single-flight; the MediaPolicy it reads.

The http tests talk only to conftest's media_http server on 127.0.0.1, which counts the requests per path.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import pytest
from PIL import Image

from conftest import pattern_image, png_bytes
from mmtriton.media import http_client, transport
from mmtriton.media import image as image_module
from mmtriton.media.audio import AudioDecoder
from mmtriton.media.decoder import MediaDecoder
from mmtriton.media.errors import MediaUnavailable
from mmtriton.media.image import ImageDecoder
from mmtriton.media.loader import MediaLoader
from mmtriton.media.policy import MediaPolicy
from mmtriton.media.transport import Fetched
from mmtriton.protocol import InvalidInput, MediaItem
from mmtriton.settings import Settings

LOCAL = Settings(allow_loopback_media_urls=True, media_fetch_timeout_s=5.0, media_connect_timeout_s=2.0)
PNG = png_bytes(pattern_image(24, 16, 9))
PNG_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()
N = 8


def run(coro: Coroutine[Any, Any, Any], timeout: float = 20.0) -> Any:
    """``coro`` on a fresh loop with a deadline; that loop's shared http session closed after."""
    async def main() -> Any:
        try:
            return await asyncio.wait_for(coro, timeout)
        finally:
            await http_client.close()

    return asyncio.run(main())


def items(url: str, n: int = N, kind: str = "image") -> list[MediaItem]:
    return [MediaItem(kind, url, f"{kind}_url[{i}]") for i in range(n)]


@pytest.fixture
def decode_calls(monkeypatch) -> list[str]:
    """Every real image decode, by the item it named."""
    calls: list[str] = []
    real = image_module.decode_image

    def counting(data: bytes, where: str, max_pixels: int) -> Image.Image:
        calls.append(where)
        return real(data, where, max_pixels)

    monkeypatch.setattr(image_module, "decode_image", counting)
    return calls


# ------------------------------------------------------------------------------------------- single-flight


def test_concurrent_loads_of_one_http_url_fetch_and_decode_once(media_http, decode_calls):
    port = media_http.server_address[1]
    url = f"http://127.0.0.1:{port}/a.png?case=single-flight"
    loader = MediaLoader(LOCAL)

    async def together() -> list[Image.Image]:
        return await asyncio.gather(*(loader.load_image(item) for item in items(url)))

    images = run(together())
    assert media_http.hits[url.split(str(port), 1)[1]] == 1
    assert len(decode_calls) == 1
    assert all(img is images[0] for img in images) and images[0].size == (100, 80)
    assert loader.stats()["items"] == 1 and loader._single_flight.in_flight() == 0


def test_an_error_reaches_every_waiter_named_for_it_and_is_not_cached(media_http):
    port = media_http.server_address[1]
    path = "/missing.png?case=single-flight-error"
    loader = MediaLoader(LOCAL)

    async def together() -> list[BaseException | Any]:
        return await asyncio.gather(*(loader.load_image(item) for item in items(f"http://127.0.0.1:{port}{path}")),
                                    return_exceptions=True)

    errors = run(together())
    assert media_http.hits[path] == 1
    for i, error in enumerate(errors):
        assert isinstance(error, InvalidInput)
        assert str(error).startswith(f"image_url[{i}]: http 404 fetching"), str(error)
    # Not remembered: the next load asks again.
    with pytest.raises(InvalidInput, match=r"^image_url\[0\]: http 404"):
        run(loader.load_image(items(f"http://127.0.0.1:{port}{path}", 1)[0]))
    assert media_http.hits[path] == 2 and loader.stats()["items"] == 0


def test_transient_errors_reach_every_waiter_as_unavailable(media_http):
    port = media_http.server_address[1]
    path = "/slow-single-flight.png"  # conftest's server sleeps 5 s on /slow*: past the 0.3 s budget
    loader = MediaLoader(Settings(allow_loopback_media_urls=True, media_fetch_timeout_s=0.3))

    async def together() -> list[BaseException | Any]:
        return await asyncio.gather(*(loader.load_image(item) for item in items(f"http://127.0.0.1:{port}{path}")),
                                    return_exceptions=True)

    errors = run(together())
    assert all(isinstance(e, MediaUnavailable) for e in errors), errors
    assert [str(e).split(":")[0] for e in errors] == [f"image_url[{i}]" for i in range(N)]
    assert all("timed out after 0.3 s" in str(e) for e in errors)


def test_concurrent_loads_of_one_data_uri_decode_once(decode_calls):
    loader = MediaLoader(Settings())

    async def together() -> list[Image.Image]:
        return await asyncio.gather(*(loader.load_image(item) for item in items(PNG_URI)))

    images = run(together())
    assert decode_calls == ["image_url[0]"] and all(img is images[0] for img in images)


@dataclass(frozen=True)
class GatedDecoder:
    """A real decoder (PNG via PIL) that waits for ``gate`` first, counting its decodes."""

    gate: threading.Event
    started: threading.Event
    calls: list[str]
    kind: ClassVar[str] = "image"

    def cache_key(self, source_key: str) -> str:
        return "gated:" + source_key

    def decode(self, data: bytes, where: str) -> Image.Image:
        self.calls.append(where)
        self.started.set()
        assert self.gate.wait(10), "gate never opened"
        return image_module.decode_image(data, where, 10_000)

    def nbytes(self, value: Image.Image) -> int:
        return image_module.image_nbytes(value)


def test_a_cancelled_leader_does_not_cancel_its_waiters():
    decoder = GatedDecoder(threading.Event(), threading.Event(), [])
    loader = MediaLoader(Settings())
    leader_item, waiter_item = items(PNG_URI, 2)

    async def scenario() -> Image.Image:
        leader = asyncio.create_task(loader.load(leader_item, decoder))
        await asyncio.to_thread(decoder.started.wait, 10)
        waiter = asyncio.create_task(loader.load(waiter_item, decoder))
        await asyncio.sleep(0.05)  # the waiter is now waiting on the leader's load
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        decoder.gate.set()
        return await waiter

    img = run(scenario())
    assert img.size == (24, 16)
    # The waiter ran the load itself once the leader was gone (the leader's thread finished on its own).
    assert decoder.calls == ["image_url[0]", "image_url[1]"]


def test_single_flight_across_event_loops():
    # One loader serves every loop of a model instance: a load on one loop is shared with a wait on another.
    decoder = GatedDecoder(threading.Event(), threading.Event(), [])
    loader = MediaLoader(Settings())
    results: dict[str, Any] = {}

    def on_own_loop(item: MediaItem) -> None:
        try:
            results[item.where] = asyncio.run(asyncio.wait_for(loader.load(item, decoder), 20))
        except BaseException as exc:  # reported by the assertion below
            results[item.where] = exc

    first, second = (threading.Thread(target=on_own_loop, args=(item,)) for item in items(PNG_URI, 2))
    first.start()
    assert decoder.started.wait(10)
    second.start()
    while loader.stats()["misses"] < 2:  # the second loop has missed the cache and is waiting
        threading.Event().wait(0.01)
    decoder.gate.set()
    first.join(20)
    second.join(20)
    assert decoder.calls == ["image_url[0]"]
    assert results["image_url[0]"] is results["image_url[1]"]
    assert isinstance(results["image_url[0]"], Image.Image)


# ------------------------------------------------------------------------------------ the two axes


def test_unsupported_scheme_is_refused_naming_the_item():
    with pytest.raises(InvalidInput, match=r"^image_url\[4\]: unsupported URL scheme 'ftp'; use data:, file://"):
        run(MediaLoader(Settings()).load_image(MediaItem("image", "ftp://x/a.png", "image_url[4]")))


def test_remote_urls_are_checked_by_the_policy_before_anything_else():
    # http(s) goes to the http transport, whose static policy refuses loopback unless allowed.
    with pytest.raises(InvalidInput, match=r"^w: http://127.0.0.1:9/a.png refused by URL policy: loopback address"):
        run(MediaLoader(Settings()).load_image(MediaItem("image", "http://127.0.0.1:9/a.png", "w")))


@dataclass
class MemoryTransport:
    """A whole new scheme, ``mem:<name>``: bytes from a dict, named by that name (so known before fetching)."""

    blobs: dict[str, bytes]
    fetches: int = 0

    def key_before_fetch(self, url: str, where: str, policy: MediaPolicy) -> str | None:
        return "mem:" + url.split(":", 1)[1]

    async def fetch(self, url: str, where: str, kind: str, policy: MediaPolicy) -> Fetched:
        self.fetches += 1
        name = url.split(":", 1)[1]
        if name not in self.blobs:
            raise InvalidInput(f"{where}: no blob {name!r}")
        return Fetched(self.blobs[name], "mem:" + name)


def test_a_new_scheme_is_one_registered_transport():
    mem = MemoryTransport({"a": PNG})
    transport.register_transport("MEM", mem)
    try:
        loader = MediaLoader(Settings())

        async def twice() -> tuple[Image.Image, Image.Image]:
            return (await loader.load_image(MediaItem("image", "mem:a", "image_url[0]")),
                    await loader.load_image(MediaItem("image", "Mem:a", "image_url[1]")))

        first, second = run(twice())
        assert first.size == (24, 16) and second is first and mem.fetches == 1  # keyed before the fetch
        with pytest.raises(InvalidInput, match=r"^image_url\[2\]: no blob 'b'"):
            run(loader.load_image(MediaItem("image", "mem:b", "image_url[2]")))
    finally:
        transport._TRANSPORTS.pop("mem")
    with pytest.raises(InvalidInput, match="unsupported URL scheme 'mem'"):
        run(MediaLoader(Settings()).load_image(MediaItem("image", "mem:a", "w")))


@dataclass(frozen=True)
class LengthDecoder:
    """A whole new modality: "text" items decoded to their UTF-8 text, costing their length."""

    kind: ClassVar[str] = "text"

    def cache_key(self, source_key: str) -> str:
        return "text:" + source_key

    def decode(self, data: bytes, where: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{where}: not UTF-8") from exc

    def nbytes(self, value: str) -> int:
        return len(value)


def test_a_new_modality_is_one_decoder():
    decoder: MediaDecoder[str] = LengthDecoder()
    loader = MediaLoader(Settings())
    uri = "data:text/plain;base64," + base64.b64encode("héllo".encode()).decode()
    assert run(loader.load(MediaItem("text", uri, "text[0]"), decoder)) == "héllo"
    assert loader.stats()["bytes"] == 5
    # The transport checks the data: URI's type against the decoder's kind.
    with pytest.raises(InvalidInput, match=r"text\[1\]: data URI type 'image/png' is not text/\*"):
        run(loader.load(MediaItem("text", PNG_URI, "text[1]"), decoder))


def test_decoders_key_their_outputs_apart():
    image, audio = ImageDecoder(100), AudioDecoder(16000, 10.0)
    assert image.cache_key("sha256:ab") == "sha256:ab"  # images keep the bare source key, as before
    assert audio.cache_key("sha256:ab") == "audio@16000Hz:sha256:ab"
    assert AudioDecoder(8000, 10.0).cache_key("sha256:ab") != audio.cache_key("sha256:ab")
    assert image.kind == "image" and audio.kind == "audio"


def test_media_policy_from_settings_reads_every_field():
    settings = Settings(
        allow_loopback_media_urls=True, allow_private_media_urls=True, allowed_local_media_dirs=("/srv/media",),
        max_media_bytes=123, max_image_pixels=456, max_audio_seconds=7.5, media_fetch_timeout_s=1.25,
        media_connect_timeout_s=0.75, media_max_redirects=9,
    )
    assert MediaPolicy.from_settings(settings) == MediaPolicy(
        allow_loopback=True, allow_private=True, allowed_local_dirs=("/srv/media",), max_bytes=123,
        max_image_pixels=456, max_audio_seconds=7.5, fetch_timeout_s=1.25, connect_timeout_s=0.75, max_redirects=9,
    )
    assert len(fields(MediaPolicy)) == 9
    loader = MediaLoader(settings)
    assert loader.policy == MediaPolicy.from_settings(settings) and loader.cache.max_bytes == settings.media_cache_bytes


def test_a_repeated_data_uri_is_answered_before_its_base64_is_decoded(monkeypatch):
    """data: URIs are keyed by the URI itself, so a hit skips the base64 decode (the costly part for a large
    image), and the shape checks still refuse a bad URI every time, cached or not."""
    reads: list[str] = []
    real = transport.read_data_uri

    def counting(url: str, where: str, kind: str, max_bytes: int) -> bytes:
        reads.append(where)
        return real(url, where, kind, max_bytes)

    monkeypatch.setattr(transport, "read_data_uri", counting)
    loader = MediaLoader(Settings())
    first = run(loader.load_image(MediaItem("image", PNG_URI, "image_url[0]")))
    again = run(loader.load_image(MediaItem("image", PNG_URI, "image_url[1]")))
    assert again is first and reads == ["image_url[0]"]
    assert loader.stats()["hits"] == 1
    # Another media type with the same payload is another URI: read (and refused) on its own.
    with pytest.raises(InvalidInput, match=r"image_url\[2\]: data URI type 'audio/wav' is not image/\*"):
        run(loader.load_image(MediaItem("image", PNG_URI.replace("image/png", "audio/wav"), "image_url[2]")))
    small = MediaLoader(Settings(max_media_bytes=len(PNG) - 1))
    with pytest.raises(InvalidInput, match=r"image_url\[3\]: data is larger than"):
        run(small.load_image(MediaItem("image", PNG_URI, "image_url[3]")))


def test_a_long_data_uri_is_keyed_off_the_event_loop(monkeypatch):
    """Its key is a hash of all of it: for a large image that would hold up every other request on the loop."""
    from mmtriton.media.loader import KEY_OFF_LOOP_CHARS

    threads: list[str] = []
    real = transport.DataUriTransport.key_before_fetch

    def spy(self, url: str, where: str, policy: MediaPolicy) -> str | None:
        threads.append(threading.current_thread().name)
        return real(self, url, where, policy)

    monkeypatch.setattr(transport.DataUriTransport, "key_before_fetch", spy)
    big = png_bytes(pattern_image(256, 256, 1))
    assert len(big) * 4 // 3 > KEY_OFF_LOOP_CHARS  # a noisy pattern: PNG cannot shrink it below the threshold
    loader = MediaLoader(Settings())
    run(loader.load_image(MediaItem("image", PNG_URI, "image_url[0]")))
    run(loader.load_image(MediaItem("image", "data:image/png;base64," + base64.b64encode(big).decode(),
                                    "image_url[1]")))
    assert threads[0] == "MainThread" and threads[1] != "MainThread"
