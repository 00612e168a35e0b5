"""Request parsing and validation (mmtriton.protocol), without a server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmtriton.protocol import InvalidInput, parse_request, parse_sampling_parameters
from mmtriton.settings import Settings

S = Settings()


def strings(*values: str) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=np.object_)


def test_text_only_request_defaults():
    req = parse_request({"text_input": strings("Hello")}, S)
    assert req.messages == [{"role": "user", "content": "Hello"}]
    assert req.media == [] and req.stream is False
    assert req.sampling.max_tokens == 16 and req.sampling.temperature == 1.0


def test_media_tensors_come_before_the_text_in_order():
    req = parse_request(
        {"text_input": strings("What?"), "image_url": strings("data:a", "data:b"), "audio_url": strings("data:c"),
         "stream": np.array([True])},
        S,
    )
    assert [(m.kind, m.url, m.where) for m in req.media] == [
        ("image", "data:a", "image_url[0]"), ("image", "data:b", "image_url[1]"), ("audio", "data:c", "audio_url[0]"),
    ]
    assert req.messages[0]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "audio"},
                                          {"type": "text", "text": "What?"}]
    assert req.stream is True


def test_openai_messages_with_every_part_type():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "Look:"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
            {"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}},
            {"type": "audio_url", "audio_url": {"url": "file:///a.wav"}},
            {"type": "video_url", "video_url": {"url": "file:///v.mp4"}},
        ]},
    ]
    req = parse_request({"messages": strings(json.dumps(messages))}, S)
    assert [m.kind for m in req.media] == ["image", "audio", "audio", "video"]
    assert req.media[1].url == "data:audio/wav;base64,UklG"
    assert req.media[0].where == "messages[1].content[1]"
    assert req.messages[1]["content"][1:] == [{"type": "image"}, {"type": "audio"}, {"type": "audio"},
                                              {"type": "video"}]


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({}, "needs 'text_input' or 'messages'"),
        ({"text_input": strings("a", "b")}, "exactly one string"),
        ({"text_input": np.array([b"\xff\xfe"], dtype=np.object_)}, "not valid UTF-8"),
        ({"messages": strings("[")}, "messages is not valid JSON"),
        ({"messages": strings("[]")}, "non-empty JSON array"),
        ({"messages": strings('[{"role": "robot", "content": "x"}]')}, "role 'robot'"),
        ({"messages": strings('[{"role": "user", "content": [{"type": "image_url"}]}]')},
         "messages[0].content[0].image_url.url"),
        ({"messages": strings('[{"role": "user", "content": [{"type": "file"}]}]')}, "type 'file'"),
        ({"messages": strings('[{"role": "user", "content": "x"}]'), "image_url": strings("data:x")}, "not both"),
        ({"text_input": strings("x"), "image_url": strings("")}, "image_url[0] is empty"),
        ({"text_input": strings("x"), "image_url": strings(*["data:x"] * 9)}, "too many media items: 9 > 8"),
    ],
)
def test_bad_requests_name_the_problem(inputs, message):
    with pytest.raises(InvalidInput) as info:
        parse_request(inputs, S)
    assert message in str(info.value)


def test_sampling_parameters_schema():
    opts = parse_sampling_parameters(json.dumps({"max_tokens": 5, "temperature": 0, "stop": "END", "seed": 3}), S)
    assert (opts.max_tokens, opts.temperature, opts.stop, opts.seed) == (5, 0.0, ["END"], 3)
    assert parse_sampling_parameters("", S).max_tokens == 16


@pytest.mark.parametrize(
    "raw, message",
    [
        ("{", "not valid JSON"),
        ("[1]", "must be a JSON object"),
        ('{"max_tokens": 0}', "max_tokens"),
        ('{"temperature": -1}', "temperature"),
        ('{"top_p": 0}', "top_p"),
        ('{"max_tokens": 10, "min_tokens": 11}', "min_tokens must not exceed"),
        ('{"max_tokens": 100000}', "exceeds 4096"),
        ('{"beam_width": 2}', "beam_width"),
    ],
)
def test_bad_sampling_parameters(raw, message):
    with pytest.raises(InvalidInput, match="sampling_parameters") as info:
        parse_sampling_parameters(raw, S)
    assert message in str(info.value)
