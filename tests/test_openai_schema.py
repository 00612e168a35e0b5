"""The OpenAI wire format ↔ the Triton contract, without a server."""

from __future__ import annotations

import json

import pytest

from mmtriton.openai_schema import ChatCompletionRequest, Completion, Delta, OpenAIError, sse
from mmtriton.protocol import error_class

HI = [{"role": "user", "content": "Hi"}]


def test_sampling_parameters_mapping():
    req = ChatCompletionRequest(model="m", messages=HI, max_tokens=5, max_completion_tokens=9, temperature=0,
                                stop="END", seed=3, top_k=4, ignore_eos=True)
    assert req.sampling_parameters(256) == {"max_tokens": 9, "temperature": 0, "seed": 3, "top_k": 4,
                                            "ignore_eos": True, "stop": ["END"]}
    assert ChatCompletionRequest(model="m", messages=HI).sampling_parameters(256) == {"max_tokens": 256}


def test_triton_inputs_carry_the_messages_unchanged_and_always_stream():
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}},
                                             {"type": "text", "text": "What?"}]}]
    inputs = ChatCompletionRequest(model="m", messages=messages).triton_inputs(16)
    assert json.loads(inputs["messages"][0]) == messages
    assert json.loads(inputs["sampling_parameters"][0]) == {"max_tokens": 16}
    assert inputs["stream"].tolist() == [True]  # a whole answer is gathered from Triton's stream
    assert ChatCompletionRequest(model="m", messages=messages, stream=True).triton_inputs(16)["stream"].tolist() == [
        True]


@pytest.mark.parametrize("extra, problem", [
    ({"n": 2}, "n:"), ({"logprobs": True}, "logprobs"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"presence_penalty": 0.5}, "presence"),
])
def test_what_cannot_be_honoured_is_refused(extra, problem):
    assert problem in ChatCompletionRequest(model="m", messages=HI, **extra).unsupported()


def test_harmless_unknown_fields_are_accepted():
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": HI, "user": "u", "presence_penalty": 0,
                                                "response_format": {"type": "text"}})
    assert req.unsupported() is None


def test_completion_objects():
    c = Completion("multimodal_agg", return_token_ids=True)
    deltas = [Delta("He", [1], "", 7, 1), Delta("llo", [2, 3], "length", 7, 3)]
    chunks = [c.first_chunk()]
    for d in deltas:
        c.add(d)
        chunks.append(c.delta_chunk(d))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [ch["choices"][0]["finish_reason"] for ch in chunks] == [None, None, "length"]
    assert chunks[2]["choices"][0]["token_ids"] == [2, 3]
    whole = c.response()
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert whole["choices"][0]["token_ids"] == [1, 2, 3]
    assert whole["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert c.usage_chunk()["choices"] == []
    assert sse("[DONE]") == b"data: [DONE]\n\n"
    assert json.loads(sse(whole)[6:]) == whole


def test_error_body_and_class():
    assert OpenAIError(404, "no such model", "model").body() == {
        "error": {"message": "no such model", "type": "not_found_error", "param": "model", "code": 404}}
    assert error_class("in ensemble 'multimodal', invalid input: image_url[0]: bad") == ("invalid_input",
                                                                                          "image_url[0]: bad")
    assert error_class("unavailable: the vLLM engine died") == ("unavailable", "the vLLM engine died")
    assert error_class("boom") == ("internal", "boom")
