"""multimodal_agg against a live tritonserver: the public contract, equality with plain vLLM, cancellation,
bad input. One server for the session (conftest.triton_server)."""

from __future__ import annotations

import base64
import json
import time
import urllib.request

import pytest
import tritonclient.grpc as grpcclient

from client import InferenceFailed, RequestInputs, build_inputs, generate_http, stream_grpc
from conftest import metric, metric_value, metrics_text, pattern_image, png_bytes

pytestmark = pytest.mark.integration
MODEL = "multimodal_agg"
GREEDY = {"max_tokens": 24, "temperature": 0.0}


def data_uri(img) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def offline_tokens(offline_vl, messages: list[dict], images: list, max_tokens: int = 24) -> tuple[list[int], int]:
    """The same request through plain vLLM offline, prompt rendered by the model's own chat template."""
    from vllm import SamplingParams

    processor_prompt = offline_vl.get_tokenizer().apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    prompt = {"prompt": processor_prompt}
    if images:
        prompt["multi_modal_data"] = {"image": images}
    out = offline_vl.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), len(out.prompt_token_ids)


def user(text: str, n_images: int = 0) -> list[dict]:
    parts = [{"type": "image"}] * n_images
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}] if parts else text}]


def collect(responses) -> dict:
    responses = list(responses)
    return {
        "responses": responses,
        "token_ids": [t for r in responses for t in r["token_ids"]],
        "text": "".join(r["text_output"] for r in responses),
        "last": responses[-1],
    }


def test_grpc_stream_text_equals_offline(triton_server, offline_vl):
    got = collect(stream_grpc(triton_server.config.grpc_url, MODEL, build_inputs("Hello there", sampling=GREEDY)))
    want, n_prompt = offline_tokens(offline_vl, user("Hello there"), [])
    assert got["token_ids"] == want
    # Streaming: one response per generated token, only the last one carries the finish reason.
    assert len(got["responses"]) == len(want)
    assert [r["finish_reason"] for r in got["responses"][:-1]] == [""] * (len(want) - 1)
    assert got["last"]["finish_reason"] in ("stop", "length")
    assert got["last"]["num_input_tokens"] == n_prompt
    assert [r["num_output_tokens"] for r in got["responses"]] == list(range(1, len(want) + 1))


def _start_and_cancel(url: str, model: str = MODEL) -> None:
    received = []
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result=None, error=None: received.append((result, error)))
    # As long as the context allows, so the request is still running when the cancel arrives even when the
    # 2 cores are busy and responses reach this client in bursts.
    inputs = build_inputs("Tell me a long story.", sampling={"max_tokens": 4000, "temperature": 0, "min_tokens": 4000})
    tensors = []
    for name, arr in inputs.arrays().items():
        t = grpcclient.InferInput(name, list(arr.shape), "BOOL" if arr.dtype == bool else "BYTES")
        t.set_data_from_numpy(arr)
        tensors.append(t)
    client.async_stream_infer(model, tensors)
    deadline = time.monotonic() + 120
    while not received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert received and received[0][1] is None, f"stream did not start: {received[:1]}"
    client.stop_stream(cancel_requests=True)
    client.close()


@pytest.mark.parametrize(("model", "engine_model"), [(MODEL, MODEL), ("multimodal_bls", "llm_decode")])
def test_cancelled_stream_is_aborted_and_server_keeps_serving(triton_server, model, engine_model):
    """The model notices a cancel within a step, aborts the vLLM request and counts it (and logs it); through
    multimodal_bls the cancel reaches llm_decode's engine too (BLS tells it: decode_cancel). Known open problem
    (README, Known issues): Triton delivers some cancels late — in a CI run the first of three consecutive
    sync-client cancels came in 0.2 s and the next two not within 30 s — so every-try bounds do not hold yet: up
    to three streams are cancelled, and one must be counted promptly."""
    url = triton_server.config.grpc_url
    counted = False
    for _ in range(3):
        cancelled_before = metric(triton_server, "mmtriton_engine", "cancelled", engine_model)
        _start_and_cancel(url, model)
        deadline = time.monotonic() + 15
        while not counted and time.monotonic() < deadline:
            counted = metric(triton_server, "mmtriton_engine", "cancelled", engine_model) > cancelled_before
            time.sleep(0.2)
        if counted:
            break
    assert counted, f"no cancel through {model} reached {engine_model}'s engine in 3 tries"
    t0 = time.monotonic()
    after = collect(stream_grpc(url, model, build_inputs("Hello", sampling={"max_tokens": 8, "temperature": 0})))
    assert len(after["token_ids"]) == 8
    # 4000 tokens would take far longer than this if the cancelled request were still running.
    assert time.monotonic() - t0 < 30


def test_grpc_stream_image_equals_offline(triton_server, offline_vl):
    img = pattern_image(100, 80, seed=1)
    inputs = build_inputs("Describe the image.", sampling=GREEDY)
    inputs.image_url = [data_uri(img)]
    got = collect(stream_grpc(triton_server.config.grpc_url, MODEL, inputs))
    want, n_prompt = offline_tokens(offline_vl, user("Describe the image.", 1), [img])
    assert got["token_ids"] == want
    # The image's tokens are counted in the prompt (4-16 for the tiny model), so it reached the engine.
    assert got["last"]["num_input_tokens"] == n_prompt
    text_only, n_text = offline_tokens(offline_vl, user("Describe the image."), [])
    assert n_prompt > n_text + 2 and want != text_only


def test_http_non_stream_equals_stream_and_offline(triton_server, offline_vl):
    imgs = [pattern_image(100, 80, seed=1), pattern_image(130, 90, seed=2)]
    inputs = RequestInputs(text_input="Compare the images.", image_url=[data_uri(i) for i in imgs],
                           sampling_parameters=GREEDY)
    result = generate_http(triton_server.config.http_url, MODEL, inputs)
    want, n_prompt = offline_tokens(offline_vl, user("Compare the images.", 2), imgs)
    assert result["token_ids"] == want
    assert result["num_input_tokens"] == n_prompt
    assert result["num_output_tokens"] == len(want)
    assert result["finish_reason"] in ("stop", "length")
    inputs.stream = True
    streamed = collect(stream_grpc(triton_server.config.grpc_url, MODEL, inputs))
    assert streamed["token_ids"] == want
    assert streamed["text"] == result["text_output"]


def test_grpc_non_stream_sends_one_final_response(triton_server, offline_vl):
    inputs = build_inputs("Hello there", sampling=GREEDY, stream=False)
    responses = list(stream_grpc(triton_server.config.grpc_url, MODEL, inputs))
    assert len(responses) == 1
    assert responses[0]["token_ids"] == offline_tokens(offline_vl, user("Hello there"), [])[0]


def test_messages_with_file_url(triton_server, offline_vl, media_dir):
    from PIL import Image

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"file://{media_dir / 'a.png'}"}},
            {"type": "text", "text": "What is it?"},
        ]},
    ]
    got = collect(stream_grpc(triton_server.config.grpc_url, MODEL,
                              RequestInputs(messages=messages, sampling_parameters=GREEDY, stream=True)))
    template_messages = [messages[0], {"role": "user", "content": [{"type": "image"},
                                                                   {"type": "text", "text": "What is it?"}]}]
    want, _ = offline_tokens(offline_vl, template_messages, [Image.open(media_dir / "a.png").convert("RGB")])
    assert got["token_ids"] == want


def test_sampling_parameters_are_applied(triton_server):
    url = triton_server.config.grpc_url
    short = collect(stream_grpc(url, MODEL, build_inputs("Hello", sampling={"max_tokens": 3, "temperature": 0})))
    assert len(short["token_ids"]) == 3 and short["last"]["finish_reason"] == "length"
    sampled = [
        collect(stream_grpc(url, MODEL, build_inputs("Hello", sampling={"max_tokens": 12, "temperature": 1.0,
                                                                         "seed": s})))["token_ids"]
        for s in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1], "same seed, same tokens"
    assert sampled[0] != sampled[2], "another seed, other tokens"


@pytest.mark.parametrize(
    "body, expect",
    [
        ({"image_url": ["x"]}, "'text_input' or 'messages'"),
        ({"text_input": "hi", "sampling_parameters": "{max_tokens: 3"}, "sampling_parameters is not valid JSON"),
        ({"text_input": "hi", "sampling_parameters": json.dumps({"max_tokens": -1})}, "max_tokens"),
        ({"text_input": "hi", "sampling_parameters": json.dumps({"temprature": 0})}, "temprature"),
        ({"text_input": "hi", "image_url": ["data:image/png;base64," + base64.b64encode(b"not a png").decode()]},
         "image_url[0]: cannot identify image data"),
        ({"text_input": "hi", "image_url": ["data:image/png;base64,@@@"]}, "image_url[0]: data URI payload"),
        ({"text_input": "hi", "image_url": ["file:///etc/passwd"]}, "not under an allowed media directory"),
        ({"text_input": "hi", "audio_url": ["data:audio/wav;base64,AAAA"]}, "does not take audio"),
        ({"messages": "[{\"role\": \"user\"}]"}, "messages[0] must be an object with 'role' and 'content'"),
    ],
)
def test_bad_input_is_invalid_arg_and_server_keeps_serving(triton_server, body, expect):
    url = f"http://{triton_server.config.http_url}/v2/models/{MODEL}/generate"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=60)
    assert info.value.code == 400
    message = json.loads(info.value.read())["error"]
    assert expect in message
    ok = generate_http(triton_server.config.http_url, MODEL, RequestInputs(text_input="hi",
                                                                          sampling_parameters={"max_tokens": 2}))
    assert len(ok["token_ids"]) == 2


def test_bad_input_over_grpc_stream_names_the_problem(triton_server):
    inputs = build_inputs("hi", sampling={"max_tokens": 2})
    inputs.image_url = ["data:image/gif;base64," + base64.b64encode(b"GIF89a" + b"\0" * 20).decode()]
    with pytest.raises(InferenceFailed, match=r"image_url\[0\]"):
        list(stream_grpc(triton_server.config.grpc_url, MODEL, inputs))


def _request_successes(triton_server) -> float:
    """Triton's own per-model counter of requests that succeeded (nv_inference_request_success, 2.51)."""
    return metric_value(metrics_text(triton_server), "nv_inference_request_success", model=MODEL)


def test_metrics_endpoint_counts_requests(triton_server):
    """Each request this test sends (gRPC stream and HTTP generate) is counted once, and nothing else is."""
    before = _request_successes(triton_server)
    short = {"max_tokens": 2, "temperature": 0.0}
    for prompt in ("Hello", "Hi there"):
        assert len(collect(stream_grpc(triton_server.config.grpc_url, MODEL, build_inputs(prompt, sampling=short)))
                   ["token_ids"]) == 2
    ok = generate_http(triton_server.config.http_url, MODEL, RequestInputs(text_input="Hey", sampling_parameters=short))
    assert len(ok["token_ids"]) == 2
    sent = 3
    # Triton counts a decoupled request when the model releases it, which may trail its last response a little.
    deadline = time.monotonic() + 10
    while _request_successes(triton_server) < before + sent and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # long enough for a double count to show
    assert _request_successes(triton_server) - before == sent


def test_model_config_holds_the_public_contract(triton_server):
    with urllib.request.urlopen(f"http://{triton_server.config.http_url}/v2/models/{MODEL}/config", timeout=10) as r:
        config = json.loads(r.read())
    inputs = {i["name"]: (i["data_type"], i["dims"]) for i in config["input"]}
    outputs = {o["name"]: (o["data_type"], o["dims"]) for o in config["output"]}
    assert inputs["text_input"][0] == "TYPE_STRING" and [int(d) for d in inputs["text_input"][1]] == [1]
    assert [int(d) for d in inputs["image_url"][1]] == [-1]
    assert set(inputs) == {"text_input", "messages", "image_url", "audio_url", "video_url",
                           "sampling_parameters", "stream"}
    assert set(outputs) == {"text_output", "token_ids", "finish_reason", "num_input_tokens", "num_output_tokens"}
    assert outputs["token_ids"][0] == "TYPE_INT64"
    assert config["model_transaction_policy"]["decoupled"] is True
    assert all(i.get("optional", False) for i in config["input"])
