"""Fuzzing of every request parser and media decoder with hypothesis.

    .venv/bin/python bench/fuzz.py --examples 10000 [--target NAME ...] [--seed N] [--in-process]

The property, for every target: the function returns normally or raises the client error of its contract
(:class:`mmtriton.protocol.InvalidInput`, which Triton answers as INVALID_ARG / HTTP 400; the OpenAI front door
also answers ``OpenAIError`` 400/413), within SLOW_S CPU seconds per input. Anything else (KeyError, TypeError,
RecursionError, MemoryError, OSError, a crash, a hang) is a bug: the server answers 500 (or dies) where it should
answer 400. ``ValueError`` is not accepted either: only InvalidInput is mapped to a client error
(triton_io.error_response), every other exception becomes INTERNAL.

Each target runs in a child process of its own (unless --in-process), so a segfault, or a hang inside native
decoder code (PIL, libsndfile, FFmpeg) that no Python-level timer can interrupt, is reported with the input that
caused it instead of killing the run: the child writes every input to a state file before running it, and the
parent kills a child whose state file has not changed for NATIVE_HANG_S. Inside the child a CPU-time timer
(ITIMER_PROF, not ITIMER_REAL which pytest-timeout uses) turns a Python-level hang into a :class:`Hang` error, and
the address space is capped (CHILD_ADDRESS_SPACE), so a decompression bomb fails as a MemoryError in the child
instead of pushing the shared machine into the OOM killer.

tests/test_fuzz.py runs the same targets with 150 derandomized examples each; known bugs are listed there with
their minimal reproducers (strict xfail, so they flip when fixed).

Never fetches anything: http(s) URLs only go through the static policy (media.http.check_url).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import faulthandler
import functools
import importlib
import importlib.util
import inspect
import io
import json
import os
import pickle
import queue
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mmtriton.protocol import INPUTS, InvalidInput, SamplingOptions
from mmtriton.settings import Settings

WHERE = "fuzz"
# An input that takes longer than this is a bug (a client could stall a model instance with it).
SLOW_S = 2.0
# CPU seconds after which a single input is declared hung (Python-level hangs; Hang is raised in the call).
HANG_CPU_S = 10.0
# Wall seconds without a new input after which the parent kills the child (hangs in native code).
NATIVE_HANG_S = 60.0
# Address-space cap of a child: every input is at most a few MB, so needing more than this is a bomb.
CHILD_ADDRESS_SPACE = 8 * 1024**3
DEFAULT_SETTINGS = Settings()
HTTP_SCHEMES = ("http", "https")

# Every code point, lone surrogates included (json.loads produces them from "\\ud800"; Triton BYTES may carry
# their surrogatepass encoding, which is invalid UTF-8).
ANY_CHAR = st.characters(exclude_categories=())
ANY_TEXT = st.text(ANY_CHAR, max_size=24)


class Hang(BaseException):  # noqa: N818 - a BaseException so the decoders' `except Exception` cannot swallow it
    """An input ran longer than HANG_CPU_S CPU seconds."""


# ------------------------------------------------------------------------------------------ generic strategies


@functools.cache  # built once: hypothesis validates a strategy each time one is built
def json_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """Any JSON value, with the numbers that break naive code: huge ints, NaN, ±inf, -0.0."""
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
        ANY_TEXT,
    )
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
        max_leaves=max_leaves,
    )


@functools.cache
def deep_nesting() -> st.SearchStrategy[str]:
    """Deeply nested JSON, closed or not: json.loads raises RecursionError past ~1000 levels."""
    return st.builds(
        lambda depth, opener, closed: opener[0] * depth + (("1" + opener[1] * depth) if closed else ""),
        st.integers(1, 20_000),
        st.sampled_from([("[", "]"), ('{"a":', "}"), ('[{"role":"user","content":', "}]")]),
        st.booleans(),
    )


@functools.cache
def huge_numbers() -> st.SearchStrategy[str]:
    """Integer literals past Python's 4300-digit int() limit (json.loads raises a plain ValueError)."""
    return st.builds(
        lambda digits, template: template.replace("N", "1" * digits),
        st.integers(4290, 12_000),
        st.sampled_from(["N", '{"max_tokens": N}', '{"seed": N}', '[{"role": "user", "content": "x", "n": N}]',
                         '{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": N}']),
    )


@st.composite
def mutated_text(draw: st.DrawFn, text: str) -> str:
    """``text`` with a few characters inserted, deleted or truncated (near-valid JSON)."""
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "truncate"]))
        if op == "insert":
            text = text[:pos] + draw(st.sampled_from(list('[]{}",:\\0eE-.') + ["NaN", "\x00"])) + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + 1:]
        else:
            text = text[:pos]
    return text


@functools.cache
def json_texts(values: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    """Dumped values (both ASCII-escaped and raw), near-valid variants, and raw text / nesting / numbers."""
    dumped = st.builds(lambda v, ascii_only: json.dumps(v, ensure_ascii=ascii_only), values, st.booleans())
    return st.one_of(dumped, dumped, dumped, dumped.flatmap(mutated_text), ANY_TEXT, deep_nesting(), huge_numbers())


def encoded(text: str) -> bytes:
    # surrogatepass: a lone surrogate becomes invalid UTF-8, as a misbehaving client could send.
    return text.encode("utf-8", "surrogatepass")


@functools.cache
def string_tensors(texts: st.SearchStrategy[str]) -> st.SearchStrategy[np.ndarray]:
    """Triton-style BYTES tensors of ``texts`` in odd shapes, plus arrays of other dtypes."""
    element = st.one_of(texts.map(encoded), texts.map(encoded), texts, st.binary(max_size=32))
    shapes = st.sampled_from([(1,), (1,), (1,), (1,), (), (0,), (2,), (1, 1), (3, 1), (1, 2)])

    def build(shape: tuple[int, ...], elements: list[Any]) -> np.ndarray:
        array = np.empty(shape, dtype=object)
        flat = array.reshape(-1)
        for i in range(flat.size):
            flat[i] = elements[i % len(elements)]
        return array

    object_arrays = st.builds(build, shapes, st.lists(element, min_size=1, max_size=6))
    odd_arrays = hnp.arrays(
        st.sampled_from([np.int64, np.float32, np.bool_, np.uint8, np.dtype("U6"), np.dtype("S6")]),
        hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3),
    )
    return st.one_of(object_arrays, object_arrays, object_arrays, odd_arrays)


# -------------------------------------------------------------------------------------------- URL strategies


@functools.cache
def base64_payloads() -> st.SearchStrategy[str]:
    valid = st.binary(max_size=96).map(lambda b: base64.b64encode(b).decode())
    return st.one_of(
        valid, valid,
        valid.map(lambda s: s.rstrip("=")),  # missing padding
        st.binary(max_size=48).map(lambda b: base64.urlsafe_b64encode(b).decode()),
        st.builds(lambda s, pos, junk: s[:pos] + junk + s[pos:], valid, st.integers(0, 200),
                  st.sampled_from([" ", "\n", "=", "%3D", "é", "\x00", "\ud800"])),
        ANY_TEXT,
    )


@functools.cache
def valid_data_uris(kinds: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[str]:
    """Well-formed base64 data: URIs (of ``kinds``), so the fuzzing also reaches the accepting paths."""
    return st.builds(lambda kind, subtype, data: f"data:{kind}/{subtype};base64,{base64.b64encode(data).decode()}",
                     kinds if kinds is not None else KINDS, st.sampled_from(["png", "wav", "mp4"]),
                     st.binary(max_size=96))


@functools.cache
def data_uris() -> st.SearchStrategy[str]:
    mimes = st.one_of(
        st.sampled_from(["image/png", "image/jpeg", "audio/wav", "audio/mpeg", "video/mp4", "text/plain",
                         "IMAGE/PNG", " image/png ", "image", "image/", "", "audio/wav;base64"]),
        ANY_TEXT,
    )
    params = st.lists(
        st.sampled_from([";base64", ";BASE64", ";charset=utf-8", ";base64;base64", ";", ";base6", " ;base64"])
        | ANY_TEXT.map(lambda s: ";" + s),
        max_size=3,
    ).map("".join)
    odd = st.builds(
        lambda scheme, mime, param, sep, payload: f"{scheme}:{mime}{param}{sep}{payload}",
        st.sampled_from(["data", "data", "data", "DATA", "Data"]), mimes, params,
        st.sampled_from([",", ",", ",", "", ",,", ";,"]), base64_payloads(),
    )
    return st.one_of(odd, odd, valid_data_uris())


@functools.cache
def hosts() -> st.SearchStrategy[str]:
    return st.one_of(
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
        st.builds(lambda a, zone: f"[{a}%{zone}]", st.ip_addresses(v=6), ANY_TEXT),
        st.sampled_from([
            "localhost", "LOCALHOST.", "a.localhost", "metadata.google.internal", "METADATA", "169.254.169.254",
            "0x7f.1", "2130706433", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]", "[64:ff9b::a00:1]", "[2002:a00:1::]",
            "[fd00:ec2::254]", "xn--", "xn--zz", "example.com", "example.com.", "exa mple.com", "%31%32%37.0.0.1",
            "[", "]", "[::1", "::1", "[::1]]", "", ".", "..", "a..b", "\u0130stanbul.tr", "ß.de", "例え.jp",
        ]),
        st.from_regex(r"[a-z0-9-]{1,12}(\.[a-z0-9-]{1,12}){0,3}\.?", fullmatch=True),
        ANY_TEXT,
        ANY_TEXT.map(lambda s: "xn--" + s),
    )


@functools.cache
def urls() -> st.SearchStrategy[str]:
    """Structured URLs (any scheme, userinfo, host, port, path, query, fragment) and raw text."""
    structured = st.builds(
        lambda scheme, sep, user, host, port, path, query, fragment: (
            f"{scheme}{sep}{user}{host}{port}{path}{query}{fragment}"
        ),
        st.sampled_from(["http", "https", "HTTP", "HtTpS", "ftp", "file", "data", "", "javascript"]) | ANY_TEXT,
        st.sampled_from(["://", "://", "://", ":", ":///", "//", ":\\\\"]),
        st.sampled_from(["", "", "", "user@", "user:pw@", ":@", "@", "a@b@"]) | ANY_TEXT.map(lambda s: s + "@"),
        hosts(),
        st.one_of(st.just(""), st.integers(-5, 70_000).map(lambda p: f":{p}"), ANY_TEXT.map(lambda s: ":" + s)),
        st.one_of(st.just(""), st.just("/"), ANY_TEXT.map(lambda s: "/" + s)),
        st.one_of(st.just(""), ANY_TEXT.map(lambda s: "?" + s)),
        st.one_of(st.just(""), ANY_TEXT.map(lambda s: "#" + s)),
    )
    plain = st.builds(lambda scheme, host, path: f"{scheme}://{host}{path}", st.sampled_from(["http", "https"]),
                      st.from_regex(r"[a-z0-9-]{1,12}(\.[a-z0-9-]{1,12}){0,3}", fullmatch=True) | hosts(),
                      st.sampled_from(["", "/", "/a.png", "/a b?q=1#f"]))
    return st.one_of(structured, structured, structured, plain, ANY_TEXT)


# --------------------------------------------------------------------------------------- request strategies


@functools.cache
def media_urls() -> st.SearchStrategy[str]:
    # http(s) URLs appear here only as strings: parse_request does not fetch.
    return st.one_of(data_uris(), urls(), st.just(""), st.just("data:image/png;base64,iVBORw0KGgo="))


@functools.cache
def content_parts() -> st.SearchStrategy[Any]:
    text_part = st.fixed_dictionaries({"type": st.just("text"), "text": ANY_TEXT | json_values()})
    url_values = media_urls() | json_values(4)

    def url_part(kind: str) -> st.SearchStrategy[dict[str, Any]]:
        value = st.one_of(st.fixed_dictionaries({"url": url_values}), url_values, st.fixed_dictionaries({}))
        return st.fixed_dictionaries({"type": st.just(kind), kind: value})

    input_audio = st.fixed_dictionaries({
        "type": st.just("input_audio"),
        "input_audio": st.one_of(
            st.fixed_dictionaries(
                {"data": base64_payloads() | json_values(3)},
                optional={"format": st.sampled_from(["wav", "mp3", "flac"]) | ANY_TEXT | json_values(3)},
            ),
            json_values(3),
        ),
    })
    # Parts whose "type" is anything at all (an unhashable list or dict included).
    odd_part = st.dictionaries(st.sampled_from(["type", "text", "image_url", "input_audio"]) | ANY_TEXT,
                               json_values(4), max_size=3)
    return st.one_of(text_part, text_part, url_part("image_url"), url_part("audio_url"), url_part("video_url"),
                     input_audio, odd_part, json_values(3))


@functools.cache
def valid_messages() -> st.SearchStrategy[list[dict[str, Any]]]:
    """Well-formed messages (text and media parts), so the accepting paths are fuzzed too."""
    part = st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": ANY_TEXT}),
        st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": urls()})}),
        st.fixed_dictionaries({"type": st.just("audio_url"), "audio_url": valid_data_uris(st.just("audio"))}),
        st.fixed_dictionaries({"type": st.just("input_audio"), "input_audio": st.fixed_dictionaries(
            {"data": base64_payloads(), "format": st.sampled_from(["wav", "mp3"])})}),
    )
    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                     "content": ANY_TEXT | st.lists(part, max_size=4)})
    return st.lists(message, min_size=1, max_size=4)


@functools.cache
def chat_messages() -> st.SearchStrategy[Any]:
    """Near-valid OpenAI messages: mostly well-formed lists, with random parts, roles and stray values."""
    role = st.one_of(st.sampled_from(["system", "user", "assistant"]), st.sampled_from(["user", "tool", ""]),
                     json_values(3))
    content = st.one_of(ANY_TEXT, st.lists(content_parts(), max_size=10), json_values(3))
    message = st.fixed_dictionaries({"role": role, "content": content},
                                    optional={"name": ANY_TEXT, "tool_calls": json_values(3)})
    missing_key = st.dictionaries(st.sampled_from(["role", "content"]), json_values(3), max_size=1)
    return st.one_of(valid_messages(), valid_messages(), st.lists(message, min_size=1, max_size=6),
                     st.lists(message | missing_key, max_size=4), json_values())


@functools.cache
def sampling_dicts() -> st.SearchStrategy[dict[str, Any]]:
    keys = st.sampled_from(sorted(SamplingOptions.model_fields)) | ANY_TEXT
    values = st.one_of(
        st.integers(-5, 5000), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(), st.none(), ANY_TEXT, st.lists(ANY_TEXT | json_values(2), max_size=3), json_values(4),
    )
    return st.dictionaries(keys, values, max_size=6)


@functools.cache
def messages_texts() -> st.SearchStrategy[str]:
    return json_texts(chat_messages())


@functools.cache
def sampling_texts() -> st.SearchStrategy[str]:
    return json_texts(sampling_dicts() | json_values())


@functools.cache
def stream_tensors() -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(st.sampled_from([np.bool_, np.int8, np.float32, np.dtype("S5")]),
                      hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=2))


@st.composite
def request_tensors(draw: st.DrawFn) -> dict[str, np.ndarray | None]:
    """parse_request's input mapping: every input present, absent or None, of any content, dtype and shape."""
    texts = {"text_input": ANY_TEXT, "messages": messages_texts(), "sampling_parameters": sampling_texts(),
             "image_url": media_urls(), "audio_url": media_urls(), "video_url": media_urls()}
    inputs: dict[str, np.ndarray | None] = {}
    for spec in INPUTS:
        name = spec["name"]
        presence = draw(st.sampled_from(["absent", "none", "value", "value"]))
        if presence == "none":
            inputs[name] = None
        elif presence == "value":
            if name == "stream":
                inputs[name] = draw(stream_tensors())
            else:
                inputs[name] = draw(string_tensors(texts[name]))
    if draw(st.booleans()):
        inputs["unknown_input"] = draw(string_tensors(ANY_TEXT))
    return inputs


def one_string(text: str) -> np.ndarray:
    return np.array([encoded(text)], dtype=object)


@functools.cache
def messages_request() -> st.SearchStrategy[dict[str, np.ndarray | None]]:
    """A messages JSON text (the focus), sometimes with *_url tensors beside it (refused as ambiguous)."""
    return st.builds(
        lambda raw, url: {"messages": one_string(raw), **({"image_url": one_string(url)} if url else {})},
        messages_texts(), st.one_of(st.none(), st.none(), st.none(), media_urls()),
    )


@functools.cache
def sampling_request() -> st.SearchStrategy[dict[str, np.ndarray | None]]:
    return st.builds(lambda raw: {"text_input": one_string("describe"), "sampling_parameters": one_string(raw)},
                     sampling_texts())


@functools.cache
def openai_bodies() -> st.SearchStrategy[bytes]:
    """Bodies of POST /v1/chat/completions: near-valid requests, then any JSON, then any bytes."""
    values = st.one_of(st.integers(-3, 5000), st.integers(-(2**70), 2**70),
                       st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(), ANY_TEXT,
                       json_values(4))
    optional = {name: values for name in (
        "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n", "logprobs", "tools",
        "frequency_penalty", "presence_penalty", "top_k", "min_tokens", "ignore_eos", "return_token_ids", "stream",
    )}
    optional["stop"] = st.one_of(ANY_TEXT, st.lists(ANY_TEXT, max_size=3), values)
    optional["stream_options"] = st.one_of(st.fixed_dictionaries({"include_usage": values}), values)
    optional["response_format"] = st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])
                                                                   | values}), values)
    requests = st.fixed_dictionaries({"model": ANY_TEXT | json_values(2), "messages": chat_messages()},
                                     optional=optional)
    return st.one_of(json_texts(requests).map(encoded), json_texts(requests).map(encoded),
                     json_texts(json_values()).map(encoded), st.binary(max_size=64))


# ------------------------------------------------------------------------------------------- media samples


def _gradient(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x ^ y) & 255], -1).astype(np.uint8)


@functools.cache
def image_samples() -> tuple[bytes, ...]:
    """Small valid images in every format and mode the decoder sees, plus formats it must refuse by name."""
    from PIL import Image

    rgb = Image.fromarray(_gradient(24, 16), "RGB")
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]

    def save(image: Image.Image, fmt: str, **options: Any) -> bytes:
        out = io.BytesIO()
        image.save(out, fmt, **options)
        return out.getvalue()

    samples = [save(rgb.convert(mode), "PNG") for mode in ("RGB", "RGBA", "L", "LA", "P", "1", "I;16")]
    samples += [save(rgb, "PNG", save_all=True, append_images=frames[1:]),  # APNG
                save(rgb, "JPEG"), save(rgb.convert("L"), "JPEG"), save(rgb.convert("CMYK"), "JPEG"),
                save(rgb, "JPEG", progressive=True), save(rgb, "WEBP"), save(rgb, "WEBP", lossless=True),
                save(rgb.convert("RGBA"), "WEBP"), save(rgb, "WEBP", save_all=True, append_images=frames[1:]),
                save(rgb, "GIF"), save(rgb, "BMP"), save(rgb, "TIFF")]
    return tuple(samples)


@functools.cache
def audio_samples() -> tuple[bytes, ...]:
    """A quarter second of sound as WAV (PCM, float, 8-bit, stereo), FLAC, OGG Vorbis/Opus, MP3, AAC (FFmpeg)."""
    import soundfile

    def tone(rate: int, channels: int) -> np.ndarray:
        t = np.arange(rate // 4) / rate
        wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        return np.stack([wave] * channels, -1) if channels > 1 else wave

    def write(rate: int, channels: int, fmt: str, subtype: str | None) -> bytes:
        out = io.BytesIO()
        soundfile.write(out, tone(rate, channels), rate, format=fmt, subtype=subtype)
        return out.getvalue()

    samples = [write(16000, 1, "WAV", "PCM_16"), write(44100, 2, "WAV", "FLOAT"), write(8000, 1, "WAV", "PCM_U8"),
               write(16000, 1, "FLAC", None), write(22050, 2, "FLAC", None), write(16000, 1, "OGG", "VORBIS"),
               write(48000, 1, "OGG", "OPUS"), write(16000, 1, "MP3", "MPEG_LAYER_III")]
    samples.append(_av_audio(tone(16000, 1), 16000))
    return tuple(samples)


def _av_audio(wave: np.ndarray, rate: int) -> bytes:
    """AAC in ADTS: a format only the PyAV fallback reads."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format="adts") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(wave.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


@functools.cache
def video_samples() -> tuple[bytes, ...]:
    """Four 32x32 frames as MPEG-4 Part 2 in MP4 and VP8 in WebM; testing.video_bytes' H.264 MP4 (rotated),
    VP9 WebM (variable frame rate), MPEG-4 AVI, and a GIF (refused by name)."""
    import av

    from mmtriton.testing import video_bytes

    samples = [video_bytes(32, 24, 1.0, 4, "mp4", seed=1, rotate=90),
               video_bytes(32, 24, container="webm", seed=2, frame_times=[0.0, 0.1, 0.5, 1.5]),
               video_bytes(31, 23, 1.0, 4, "avi", seed=3), video_bytes(16, 16, 1.0, 2, "gif")]
    for fmt, codec in (("mp4", "mpeg4"), ("webm", "libvpx")):
        out = io.BytesIO()
        with av.open(out, "w", format=fmt) as container:
            stream = container.add_stream(codec, rate=4)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            for i in range(4):
                frame = av.VideoFrame.from_ndarray(np.roll(_gradient(32, 32), i * 4, axis=1), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        samples.append(out.getvalue())
    return tuple(samples)


EXTREME_INTS = [0, 1, 2, 7, 255, 4096, 4097, 65535, 65536, 2**24 - 1, 2**31 - 1, 2**31, 2**32 - 1]


@functools.cache
def field_values(bits: int) -> st.SearchStrategy[int]:
    limit = 2**bits - 1
    return st.sampled_from([min(v, limit) for v in EXTREME_INTS]) | st.integers(0, limit)


@st.composite
def mutated(draw: st.DrawFn, samples: tuple[bytes, ...]) -> bytes:
    """A valid sample with a few byte-level mutations, most of them in the header."""
    data = bytearray(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, min(63, len(data))) | st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "set", "int32", "insert", "delete", "truncate"]))
        if op == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and pos < len(data):
            data[pos] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80]) | st.integers(0, 255))
        elif op == "int32":
            data[pos:pos + 4] = struct.pack(draw(st.sampled_from(["<I", ">I"])), draw(field_values(32)))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        else:
            del data[pos:]
    return bytes(data)


def _set_be(data: bytearray, offset: int, size: int, value: int) -> None:
    data[offset:offset + size] = value.to_bytes(size, "big")


@st.composite
def image_headers(draw: st.DrawFn) -> bytes:
    """Valid images whose header claims other (often huge) dimensions: PNG IHDR (CRC fixed), JPEG SOF, WEBP."""
    samples = image_samples()
    data = bytearray(draw(st.sampled_from(samples)))
    width, height = draw(field_values(32)), draw(field_values(32))
    if data.startswith(b"\x89PNG"):
        _set_be(data, 16, 4, width)
        _set_be(data, 20, 4, height)
        _set_be(data, 29, 4, zlib.crc32(bytes(data[12:29])))
        if draw(st.booleans()):  # sometimes no image data at all
            del data[33:]
            data += b"\x00\x00\x00\x00IEND\xaeB`\x82"
    elif data.startswith(b"\xff\xd8"):
        sof = next((i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2)), None)
        if sof is not None:
            _set_be(data, sof + 5, 2, height & 0xFFFF)
            _set_be(data, sof + 7, 2, width & 0xFFFF)
    elif data[8:12] == b"WEBP":
        chunk = bytes(data[12:16])
        if chunk == b"VP8X":
            data[24:27] = (width & 0xFFFFFF).to_bytes(3, "little")
            data[27:30] = (height & 0xFFFFFF).to_bytes(3, "little")
        elif chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            bits = (bits & ~0xFFFFFFF) | (width & 0x3FFF) | ((height & 0x3FFF) << 14)
            data[21:25] = bits.to_bytes(4, "little")
        elif chunk == b"VP8 ":
            data[26:28] = (width & 0x3FFF).to_bytes(2, "little")
            data[28:30] = (height & 0x3FFF).to_bytes(2, "little")
    return bytes(data)


@st.composite
def audio_headers(draw: st.DrawFn) -> bytes:
    """Valid audio whose header lies: WAV fmt/data fields, FLAC STREAMINFO (rate, channels, bits, length)."""
    samples = [s for s in audio_samples() if s.startswith((b"RIFF", b"fLaC"))]
    data = bytearray(draw(st.sampled_from(samples)))
    if data.startswith(b"RIFF"):
        fmt = data.find(b"fmt ")
        chunk_data = data.find(b"data")
        fields = [(fmt + 8, "<H"), (fmt + 10, "<H"), (fmt + 12, "<I"), (fmt + 16, "<I"), (fmt + 20, "<H"),
                  (fmt + 22, "<H"), (chunk_data + 4, "<I"), (4, "<I")]
        for offset, layout in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3)):
            data[offset:offset + struct.calcsize(layout)] = struct.pack(
                layout, draw(field_values(8 * struct.calcsize(layout))))
    else:
        # STREAMINFO bytes 18..25: sample rate (20 bits), channels-1 (3), bits-1 (5), total samples (36).
        packed = int.from_bytes(data[18:26], "big")
        for start, bits in draw(st.lists(st.sampled_from([(0, 20), (20, 3), (23, 5), (28, 36)]), min_size=1,
                                         max_size=3)):
            shift = 64 - start - bits
            packed = (packed & ~(((1 << bits) - 1) << shift)) | (draw(field_values(bits)) << shift)
        data[18:26] = packed.to_bytes(8, "big")
        if draw(st.booleans()):  # the block sizes too
            data[8:12] = struct.pack(">HH", draw(field_values(16)), draw(field_values(16)))
    return bytes(data)


def media_bytes(samples: Callable[[], tuple[bytes, ...]],
                headers: Callable[[], st.SearchStrategy[bytes]] | None) -> st.SearchStrategy[bytes]:
    strategies = [st.binary(max_size=2048), st.sampled_from(samples()), mutated(samples()), mutated(samples()),
                  mutated(samples())]
    if headers is not None:
        strategies += [headers(), headers()]
    return st.one_of(strategies)


# -------------------------------------------------------------------------------------------- the targets


@dataclass
class Target:
    name: str
    what: str
    strategy: Callable[[], st.SearchStrategy[Any]]
    call: Callable[[Any], Any]
    # Whether an exception is the documented client error of this function.
    expected: Callable[[BaseException], bool] = lambda exc: isinstance(exc, InvalidInput)
    # Why the target cannot run here (None: it can).
    unavailable: Callable[[], str | None] = lambda: None
    # A valid input, run once before timing starts (lazy imports such as librosa take seconds).
    warmup: Callable[[], Any] = lambda: None


def _decoder_call(function: Callable[..., Any], **known: Any) -> Callable[[bytes], Any]:
    """Bind a decoder by its parameter names (its signature may change under us): the first parameter is the
    data, the others come from ``known``; an unknown required parameter is a setup error, not a fuzz finding."""
    parameters = list(inspect.signature(function).parameters.values())
    bound: dict[str, Any] = {}
    for parameter in parameters[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.name in known:
            bound[parameter.name] = known[parameter.name]
        elif parameter.default is parameter.empty:
            raise TypeError(f"{function.__module__}.{function.__qualname__}: no fuzz value for {parameter.name!r}")
    return lambda data: function(data, **bound)


def _audio_known(sample_rate: int, max_seconds: float) -> dict[str, Any]:
    return {"where": WHERE, "sample_rate": sample_rate, "target_sample_rate": sample_rate, "sr": sample_rate,
            "max_seconds": max_seconds, "settings": DEFAULT_SETTINGS}


def call_image(example: tuple[bytes, int]) -> Any:
    from mmtriton.media.image import decode_image

    data, max_pixels = example
    return _decoder_call(decode_image, where=WHERE, max_pixels=max_pixels, settings=DEFAULT_SETTINGS)(data)


def call_audio(example: tuple[bytes, int, float]) -> Any:
    from mmtriton.media.audio import decode_audio

    data, sample_rate, max_seconds = example
    return _decoder_call(decode_audio, **_audio_known(sample_rate, max_seconds))(data)


VIDEO_MODULE = "mmtriton.media.video"


def video_decoder() -> Callable[..., Any] | None:
    if importlib.util.find_spec(VIDEO_MODULE) is None:
        return None
    module = importlib.import_module(VIDEO_MODULE)
    return next((getattr(module, n) for n in ("decode_video", "load_video", "read_video") if hasattr(module, n)),
                None)


def _video_known() -> dict[str, Any]:
    known: dict[str, Any] = {"where": WHERE, "settings": DEFAULT_SETTINGS, "max_frames": 8, "num_frames": 8,
                             "max_pixels": DEFAULT_SETTINGS.max_image_pixels}
    module = importlib.import_module(VIDEO_MODULE)
    if hasattr(module, "VideoLimits"):  # decode_video(data, where, limits, num_frames=|fps=)
        known["limits"] = module.VideoLimits.from_settings(DEFAULT_SETTINGS)
    return known


def video_unavailable() -> str | None:
    decoder = video_decoder()
    if decoder is None:
        return f"no {VIDEO_MODULE}.decode_video in this checkout"
    try:
        _decoder_call(decoder, **_video_known())
    except TypeError as exc:
        return str(exc)
    return None


def call_video(data: bytes) -> Any:
    decoder = video_decoder()
    assert decoder is not None
    return _decoder_call(decoder, **_video_known())(data)


def call_parse_request(inputs: dict[str, np.ndarray | None]) -> Any:
    from mmtriton.protocol import parse_request

    return parse_request(inputs, DEFAULT_SETTINGS)


@functools.cache
def data_uri_examples() -> st.SearchStrategy[tuple[str, str, int]]:
    """(url, kind expected, max_bytes): odd data: URIs, other non-http schemes, and valid URIs of the kind."""
    not_http = (data_uris() | urls()).filter(lambda u: u.split(":", 1)[0].strip().lower() not in HTTP_SCHEMES)
    return KINDS.flatmap(lambda kind: st.tuples(
        not_http | valid_data_uris(st.just(kind)), st.just(kind),
        st.sampled_from([0, 1, 64, DEFAULT_SETTINGS.max_media_bytes]),
    ))


def call_data_uri(example: tuple[str, str, int]) -> Any:
    from mmtriton.media.fetch import read_data_uri, read_media_bytes, url_scheme

    url, kind, max_bytes = example
    scheme = url_scheme(url)
    if scheme in HTTP_SCHEMES:
        raise AssertionError(f"fuzz strategy produced a fetching URL {url!r}")  # never fetch: the filter failed
    if scheme == "data":
        with contextlib.suppress(InvalidInput):
            read_data_uri(url, WHERE, kind, max_bytes)
    # The dispatch, under the default settings (file:// disabled, so no disk access).
    return read_media_bytes(url, WHERE, kind, DEFAULT_SETTINGS)


@functools.cache
def media_dir() -> str:
    """An allowed media directory with a file, a subdirectory and a symlink out of it (removed at exit)."""
    import atexit

    root = Path(tempfile.mkdtemp(prefix="mmt-fuzz-"))
    atexit.register(shutil.rmtree, root, True)
    allowed, outside = root / "allowed", root / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "a.png").write_bytes(image_samples()[0])
    (outside / "secret").write_bytes(b"not media")
    (allowed / "link_out").symlink_to(outside / "secret")
    return str(allowed)


@functools.cache
def file_urls() -> st.SearchStrategy[str]:
    segment = st.one_of(
        st.sampled_from(["a.png", "a.png", "sub", "link_out", "..", ".", "", "%2e%2e", "%00", "\x00", "a" * 300,
                         "%ff", "a.png%00", "~", "%2F"]),
        ANY_TEXT,
    )
    paths = st.builds(lambda prefix, segments: prefix + "/".join(segments),
                      st.sampled_from(["{dir}/", "{dir}/", "/", "", "{dir}"]), st.lists(segment, max_size=4))
    netlocs = st.sampled_from(["", "", "", "localhost", "LOCALHOST", "example.com", "user@"]) | ANY_TEXT
    return st.builds(lambda scheme, netloc, path: f"{scheme}://{netloc}{path}",
                     st.sampled_from(["file", "FILE"]), netlocs, paths)


def call_file_url(url_template: str) -> Any:
    from mmtriton.media.fetch import read_media_bytes

    settings = Settings(allowed_local_media_dirs=(media_dir(),))
    return read_media_bytes(url_template.replace("{dir}", media_dir()), WHERE, "image", settings)


def call_url_policy(example: tuple[str, Any, bool, bool]) -> Any:
    from mmtriton.media.http import address_refusal, check_url

    url, address, allow_loopback, allow_private = example
    # Pure: returns a reason or None, for every address.
    reason = address_refusal(address, allow_loopback=allow_loopback, allow_private=allow_private)
    if not (reason is None or isinstance(reason, str)):
        raise AssertionError(f"address_refusal returned {reason!r}")
    settings = Settings(allow_loopback_media_urls=allow_loopback, allow_private_media_urls=allow_private)
    target = check_url(url, WHERE, settings)
    # What MediaLoader uses next (cache key, Host header) must not fail on an accepted URL either.
    return target.normalized, target.host_header


def openai_expected(exc: BaseException) -> bool:
    from mmtriton.openai_schema import OpenAIError

    return isinstance(exc, InvalidInput) or (isinstance(exc, OpenAIError) and exc.status in (400, 413))


_LOOP: asyncio.AbstractEventLoop | None = None


def call_openai(body: bytes) -> Any:
    """The OpenAI front door as the server runs it: the request body through openai_server._read_request (a real
    starlette Request), then the translation to Triton inputs, then the Triton model's parse_request."""
    global _LOOP
    from starlette.requests import Request

    from mmtriton import openai_server
    from mmtriton.protocol import parse_request

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    max_body = openai_server.OpenAIServerConfig().max_body_bytes
    chat = _LOOP.run_until_complete(openai_server._read_request(Request(scope, receive), max_body))
    inputs = chat.triton_inputs(openai_server.OpenAIServerConfig().default_max_tokens)
    return parse_request(inputs, DEFAULT_SETTINGS)


def _valid_wav() -> bytes:
    return audio_samples()[0]


KINDS = st.sampled_from(["image", "audio", "video"])
TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("request_tensors", "protocol.parse_request: every input present/absent/None, any content, dtype, shape",
           request_tensors, call_parse_request,
           warmup=lambda: call_parse_request({"text_input": one_string("hi")})),
    Target("messages", "protocol.parse_request: messages JSON (near-valid OpenAI messages, raw text, nesting)",
           messages_request, call_parse_request),
    Target("sampling_parameters", "protocol.parse_request: sampling_parameters JSON (wrong types, NaN, huge)",
           sampling_request, call_parse_request),
    Target("openai_request", "openai_server._read_request + ChatCompletionRequest.triton_inputs + parse_request",
           openai_bodies, call_openai, expected=openai_expected,
           warmup=lambda: call_openai(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')),
    Target("data_uri", "media.fetch.read_data_uri and read_media_bytes' scheme dispatch (never http)",
           data_uri_examples, call_data_uri),
    Target("file_url", "media.fetch.read_media_bytes for file:// under an allowed directory", file_urls,
           call_file_url),
    Target("url_policy", "media.http.check_url (+ Target.normalized/host_header) and address_refusal; no fetch",
           lambda: st.tuples(urls(), st.ip_addresses(), st.booleans(), st.booleans()), call_url_policy),
    Target("image", "media.image.decode_image: random bytes, mutated PNG/JPEG/WEBP/GIF/BMP/TIFF, lying headers",
           lambda: st.tuples(media_bytes(image_samples, image_headers),
                             st.sampled_from([DEFAULT_SETTINGS.max_image_pixels, 1, 24 * 16, 4096 * 4096])),
           call_image, warmup=lambda: call_image((image_samples()[0], DEFAULT_SETTINGS.max_image_pixels))),
    Target("audio", "media.audio.decode_audio: random bytes, mutated WAV/FLAC/OGG/MP3/AAC, lying headers",
           lambda: st.tuples(media_bytes(audio_samples, audio_headers), st.sampled_from([16000, 16000, 8000, 48000]),
                             st.sampled_from([DEFAULT_SETTINGS.max_audio_seconds, 0.1, 30.0])),
           call_audio, warmup=lambda: call_audio((_valid_wav(), 16000, 600.0))),
    Target("video", f"{VIDEO_MODULE}.decode_video: random bytes, mutated MP4 (MPEG-4, H.264)/WebM (VP8, VP9)/AVI/GIF",
           lambda: media_bytes(video_samples, None), call_video, unavailable=video_unavailable,
           warmup=lambda: call_video(video_samples()[0])),
]}


# ------------------------------------------------------------------------------------------- running inputs


@dataclass
class Outcome:
    kind: str  # "ok" | "invalid" | "bug"
    seconds: float  # wall clock
    error: BaseException | None = None
    why: str = ""  # for bugs: "exception", "slow", "hang"
    cpu_seconds: float = 0.0  # this process, all threads: what the SLOW_S verdict uses


def _on_cpu_timer(signum: int, frame: Any) -> None:
    raise Hang(f"over {HANG_CPU_S:g} CPU seconds")


@contextlib.contextmanager
def cpu_time_limit(seconds: float):
    """Raise Hang in the main thread once this process has used ``seconds`` of CPU (no-op off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGPROF, _on_cpu_timer)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def run_one(target: Target, example: Any, slow_s: float | None = SLOW_S) -> Outcome:
    """Run one input and classify it. ``slow_s=None``: no time verdict.

    "Slow" is judged on CPU seconds, not wall clock: on a shared, loaded machine a parse that takes 1 ms of CPU
    was once measured at 14 s of wall clock (scheduling), while what a hostile input can cost us is CPU."""
    start, cpu_start = time.perf_counter(), time.process_time()
    error: BaseException | None = None
    kind, why = "ok", ""
    try:
        with cpu_time_limit(HANG_CPU_S):
            target.call(example)
    except Hang as exc:
        error, kind, why = exc, "bug", "hang"
    except Exception as exc:  # RecursionError and MemoryError included: they are bugs like any other
        error = exc
        kind, why = ("invalid", "") if target.expected(exc) else ("bug", "exception")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if kind != "bug" and slow_s is not None and cpu_seconds > slow_s:
        kind, why = "bug", "slow"
    return Outcome(kind, seconds, error, why, cpu_seconds)


def bug_signature(outcome: Outcome) -> str:
    """Which bug this is: the exception type and the innermost frame of the project's code (else the last one)."""
    if outcome.why == "slow":
        return "slow input"
    exc = outcome.error
    assert exc is not None
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/mmtriton/" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} in {ours[-1].name}" if ours else "?"
    return f"{type(exc).__name__} at {where}"


def short_repr(value: Any, limit: int = 400) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


@dataclass
class Bug:
    signature: str
    count: int
    message: str
    example: str  # the shortest repr seen
    seconds: float


@dataclass
class TargetReport:
    name: str
    examples: int = 0
    ok: int = 0
    invalid: int = 0
    other: int = 0
    max_seconds: float = 0.0  # wall clock
    max_cpu_seconds: float = 0.0
    slowest: str = ""  # the input with the most CPU seconds
    seconds_total: float = 0.0
    bugs: dict[str, Bug] = field(default_factory=dict)
    skipped: str | None = None
    crashed: str | None = None

    def add(self, outcome: Outcome, example: Any) -> None:
        self.examples += 1
        counter = {"ok": "ok", "invalid": "invalid", "bug": "other"}[outcome.kind]
        setattr(self, counter, getattr(self, counter) + 1)
        self.max_seconds = max(self.max_seconds, outcome.seconds)
        if outcome.cpu_seconds > self.max_cpu_seconds:
            self.max_cpu_seconds, self.slowest = outcome.cpu_seconds, short_repr(example, 200)
        if outcome.kind == "bug":
            signature = bug_signature(outcome)
            text = short_repr(example)
            message = f"{type(outcome.error).__name__}: {outcome.error}"[:300] if outcome.error else ""
            if outcome.why == "slow":
                message = f"{outcome.cpu_seconds:.2f} CPU s (limit {SLOW_S:g} s); {message}"
            known = self.bugs.get(signature)
            if known is None:
                self.bugs[signature] = Bug(signature, 1, message, text, outcome.seconds)
            else:
                known.count += 1
                if len(text) < len(known.example):
                    known.example, known.message, known.seconds = text, message, outcome.seconds

    @property
    def failed(self) -> bool:
        return self.other > 0 or self.crashed is not None


def run_target(target: Target, examples: int, seed_value: int | None, state_path: str | None = None,
               slow_s: float | None = SLOW_S, progress: Callable[[TargetReport], None] | None = None,
               derandomize: bool = False) -> TargetReport:
    """Generate ``examples`` inputs (generation only: no shrinking; the shortest failing input is kept instead)
    and classify every one. ``state_path``: each input is pickled there before it runs (for the parent).
    ``derandomize``: the same inputs on every run (CI), whatever ``seed_value``."""
    report = TargetReport(target.name)
    reason = target.unavailable()
    if reason:
        report.skipped = reason
        return report
    target.warmup()
    state = open(state_path, "wb") if state_path else None  # noqa: SIM115 - kept open for the whole run
    last_progress = [time.monotonic()]

    # No hypothesis deadline: run_one times every input itself (SLOW_S) and keeps counting after a slow one.
    @hypothesis_settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                         derandomize=derandomize,
                         suppress_health_check=list(HealthCheck), print_blob=False)
    @given(target.strategy())
    def one(example: Any) -> None:
        if state is not None:
            state.seek(0)
            state.truncate()
            pickle.dump(example, state)
            state.flush()
        started = time.perf_counter()
        report.add(run_one(target, example, slow_s), example)
        report.seconds_total += time.perf_counter() - started
        every = max(100, examples // 10)
        if progress and (report.examples % every == 0 or time.monotonic() - last_progress[0] > 15):
            last_progress[0] = time.monotonic()
            progress(report)

    if seed_value is not None and not derandomize:
        one = seed(seed_value)(one)
    try:
        one()
    finally:
        if state is not None:
            state.close()
    return report


# ----------------------------------------------------------------------------------------- child processes


def _print_progress(report: TargetReport) -> None:
    print(f"  [{report.name}] {report.examples} examples: ok={report.ok} invalid={report.invalid} "
          f"other={report.other} max={report.max_seconds:.3f}s (cpu {report.max_cpu_seconds:.3f}s)", flush=True)


def child_main(name: str, examples: int, seed_value: int | None, state_path: str, derandomize: bool) -> None:
    """In the child: cap the address space, run one target, print its report as the last line (JSON)."""
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))
    faulthandler.enable()  # a native crash prints the Python stack into the stderr tail the parent reports
    warnings.simplefilter("ignore")  # PIL's "Corrupt EXIF data" and the like, thousands of times
    report = run_target(TARGETS[name], examples, seed_value, state_path, progress=_print_progress,
                        derandomize=derandomize)
    print("RESULT " + json.dumps(asdict(report)), flush=True)


def run_in_child(name: str, examples: int, seed_value: int | None, derandomize: bool = False,
                 echo: bool = True) -> TargetReport:
    """Run one target in a child; a crash or a native hang becomes a report naming the input that caused it.
    The child's stderr (decoder libraries print there) is kept in a file and shown only when it crashed."""
    with tempfile.TemporaryDirectory(prefix="mmt-fuzz-state-") as tmp:
        state_path = os.path.join(tmp, "input.pickle")
        command = [sys.executable, __file__, "--child", name, "--examples", str(examples), "--state", state_path]
        if seed_value is not None:
            command += ["--seed", str(seed_value)]
        if derandomize:
            command.append("--derandomize")
        stderr = open(os.path.join(tmp, "stderr.txt"), "w+")  # noqa: SIM115 - read back after the child ends
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert child.stdout is not None
            for line in child.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        result: dict[str, Any] | None = None
        hung = False
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                changed = os.path.getmtime(state_path) if os.path.exists(state_path) else time.time()
                if child.poll() is None and time.time() - changed > NATIVE_HANG_S:
                    hung = True
                    child.kill()
                continue
            if line is None:
                break
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
            elif echo:
                print(line, end="", flush=True)
        returncode = child.wait()
        stderr.seek(0)
        stderr_tail = stderr.read()[-3000:]
        stderr.close()
        if result is not None:
            bugs = {k: Bug(**v) for k, v in result.pop("bugs").items()}
            return TargetReport(**result, bugs=bugs)
        report = TargetReport(name)
        last = "(no input yet)"
        with contextlib.suppress(Exception), open(state_path, "rb") as state:
            last = short_repr(pickle.load(state), 2000)
            kept = Path(tempfile.gettempdir()) / f"mmt-fuzz-{name}-crash.pickle"
            shutil.copyfile(state_path, kept)
            last += f" (pickled in {kept})"
        how = (f"no new input for {NATIVE_HANG_S:g} s (hang in native code)" if hung
               else f"child exited with {returncode} ({_signal_name(returncode)})")
        report.crashed = f"{how}; last input: {last}\n  stderr tail:\n{stderr_tail}"
        return report


def _signal_name(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-returncode).name
    return "no result line"


def print_table(reports: list[TargetReport]) -> None:
    print(f"\n{'target':<20} {'examples':>8} {'ok':>7} {'invalid':>8} {'other':>6} {'max s':>7} {'max cpu':>7} "
          f"{'total s':>8}")
    for r in reports:
        if r.skipped:
            print(f"{r.name:<20} skipped: {r.skipped}")
            continue
        print(f"{r.name:<20} {r.examples:>8} {r.ok:>7} {r.invalid:>8} {r.other:>6} {r.max_seconds:>7.3f} "
              f"{r.max_cpu_seconds:>7.3f} {r.seconds_total:>8.1f}" + ("  CRASHED" if r.crashed else ""))
    for r in reports:
        if r.crashed:
            print(f"\n[{r.name}] CRASH: {r.crashed}")
        for bug in r.bugs.values():
            print(f"\n[{r.name}] BUG x{bug.count}: {bug.signature}\n  {bug.message}\n  shortest input: {bug.example}")
        if r.slowest and not r.skipped:
            print(f"\n[{r.name}] most CPU ({r.max_cpu_seconds:.3f} s): {r.slowest}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=10_000, help="inputs per target (default 10000)")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="repeatable; default: all")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    parser.add_argument("--derandomize", action="store_true", help="the same inputs every run (as CI runs them)")
    parser.add_argument("--in-process", action="store_true", help="no child processes (a crash ends the run)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.examples, args.seed, args.state, args.derandomize)
        return 0
    reports = []
    for name in args.target or list(TARGETS):
        print(f"[{name}] {TARGETS[name].what}: {args.examples} examples", flush=True)
        if args.in_process:
            reports.append(run_target(TARGETS[name], args.examples, args.seed, progress=_print_progress,
                                      derandomize=args.derandomize))
        else:
            reports.append(run_in_child(name, args.examples, args.seed, args.derandomize))
    print_table(reports)
    failed = [r.name for r in reports if r.failed]
    print(f"\n{'BUGS in: ' + ', '.join(failed) if failed else 'no bugs found'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
