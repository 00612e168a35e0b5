"""The disaggregated path (encoder_image → NIXL → llm_prefill → KV connector → llm_decode) through
multimodal_bls, against the same live server as multimodal_agg: identical greedy tokens, proof that decode used
the transferred KV, refusal of forged hand-overs, and media failures that name the item and leak nothing."""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.request

import pytest

from client import InferenceFailed, RequestInputs, build_inputs, generate_http, stream_grpc
from conftest import metric, pattern_image, png_bytes
from mmtriton.disagg import core_split
from mmtriton.supervisor import descendant_named, newest_stub
from mmtriton.testing import assert_pool_drained

pytestmark = pytest.mark.integration
PATHS = ("multimodal_agg", "multimodal_bls", "multimodal")
GREEDY = {"max_tokens": 24, "temperature": 0.0}
GAUGE_SETTLE_S = 1.2  # > GaugeExporter's refresh interval


def data_uri(img) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def tokens(server, model: str, inputs: RequestInputs) -> tuple[list[int], list[dict]]:
    responses = list(stream_grpc(server.config.grpc_url, model, inputs, timeout_s=180))
    return [t for r in responses for t in r["token_ids"]], responses


def offline(offline_vl, text: str, images: list, max_tokens: int = 24) -> list[int]:
    from vllm import SamplingParams

    parts = [{"type": "image"}] * len(images)
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": text}] if parts else text}]
    prompt = {"prompt": offline_vl.get_tokenizer().apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True)}
    if images:
        prompt["multi_modal_data"] = {"image": images}
    out = offline_vl.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def all_paths_equal(server, offline_vl, text: str, urls: list[str], images: list) -> list[int]:
    want = offline(offline_vl, text, images)
    for model in PATHS:
        inputs = build_inputs(text, sampling=GREEDY)
        inputs.image_url = urls or None
        got, responses = tokens(server, model, inputs)
        assert got == want, model
        assert responses[-1]["finish_reason"] in ("stop", "length")
    return want


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: prefill and decode share it by design")
def test_prefill_and_decode_engines_compute_on_their_own_cores(triton_server):
    """vLLM 0.32's NIXL connector moves the worker's main thread, OpenMP's master (the one that computes), to the
    last core; mmtriton.kv_connector puts it back. Without that, both engines computed on core 1 of 2."""
    for model, cores in zip(("llm_prefill", "llm_decode"), core_split(), strict=True):
        stub = newest_stub(triton_server.process.pid, model)
        assert stub is not None, f"no stub process for {model}"
        worker = descendant_named(stub.pid, "VLLM::Worker")
        assert worker is not None, f"no vLLM worker under {model}'s stub (pid {stub.pid})"
        wanted = {int(core) for core in cores.split(",")}
        assert os.sched_getaffinity(worker.pid) == wanted, f"{model}'s worker computes on the wrong cores"


def test_text_only(triton_server, offline_vl):
    all_paths_equal(triton_server, offline_vl, "Hello there", [], [])


def test_one_image_data_uri(triton_server, offline_vl):
    img = pattern_image(100, 80, seed=1)
    all_paths_equal(triton_server, offline_vl, "Describe the image.", [data_uri(img)], [img])


def test_one_image_file_and_http(triton_server, offline_vl, media_dir, media_http):
    from PIL import Image

    img = Image.open(media_dir / "b.png").convert("RGB")
    port = media_http.server_address[1]
    for url in (f"file://{media_dir / 'b.png'}", f"http://127.0.0.1:{port}/b.png"):
        all_paths_equal(triton_server, offline_vl, "What is this?", [url], [img])


def test_three_images(triton_server, offline_vl):
    imgs = [pattern_image(100, 80, seed=1), pattern_image(130, 90, seed=2), pattern_image(60, 100, seed=3)]
    all_paths_equal(triton_server, offline_vl, "Compare the three.", [data_uri(i) for i in imgs], imgs)


def test_same_image_twice_is_served_from_the_encoder_cache(triton_server, media_http):
    port = media_http.server_address[1]
    url = f"http://127.0.0.1:{port}/a.png?twice"
    time.sleep(GAUGE_SETTLE_S)  # the gauges refresh every 0.5 s: let earlier requests' counts arrive
    hits = metric(triton_server, "mmtriton_media_cache", "hits", "encoder_image")
    first, _ = tokens(triton_server, "multimodal_bls", RequestInputs(
        text_input="Again?", image_url=[url], sampling_parameters=GREEDY, stream=True))
    second, _ = tokens(triton_server, "multimodal_bls", RequestInputs(
        text_input="Again?", image_url=[url], sampling_parameters=GREEDY, stream=True))
    assert first == second
    time.sleep(GAUGE_SETTLE_S)
    assert metric(triton_server, "mmtriton_media_cache", "hits", "encoder_image") == hits + 1
    assert media_http.hits["/a.png?twice"] == 1, "the second request must not fetch again"


def test_long_prompt_decode_uses_the_transferred_kv(triton_server, offline_vl, tiny_models):
    """Decode is given zero embeddings for the image; only prefill saw the real ones. Equal tokens therefore
    mean decode's KV for the image came from prefill over the connector, not from its own recomputation."""
    import torch
    from vllm import SamplingParams

    from mmtriton.encoder import Qwen2VLImageEncoder

    img = pattern_image(100, 80, seed=1)
    text = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 30)
    want = all_paths_equal(triton_server, offline_vl, text, [data_uri(img)], [img])
    # The proof is meaningful: the same prompt with zero image embeddings gives other tokens.
    encoded = Qwen2VLImageEncoder(str(tiny_models["qwen2-vl"])).encode_many([img])[0]
    prompt = offline_vl.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
        tokenize=False, add_generation_prompt=True)
    zeros = offline_vl.generate({"prompt": prompt, "multi_modal_data": {"image": {
        "image_embeds": torch.zeros_like(encoded.embeddings),
        "image_grid_thw": torch.tensor([list(encoded.grid_thw)])}}},
        SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0]
    assert list(zeros.outputs[0].token_ids) != want
    assert len(zeros.prompt_token_ids) > 3 * 128, "several whole 128-token KV blocks"


def stage_count(server, model: str, stage: str) -> float:
    time.sleep(GAUGE_SETTLE_S)
    try:
        return metric(server, "mmtriton_stage_count", stage, model)
    except (AssertionError, KeyError, ValueError):  # not exported before its first count
        return 0.0


def prompt_tokens(server, text: str, urls: list[str]) -> int:
    inputs = build_inputs(text, sampling={"max_tokens": 1, "temperature": 0})
    inputs.image_url = urls or None
    return int(tokens(server, "multimodal_agg", inputs)[1][0]["num_input_tokens"])


def block_boundary_prompt(server, urls: list[str]) -> str:
    """A prompt (with ``urls``) whose token count fills its last 128-token KV block exactly."""
    text = "Describe it. " + " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    for _ in range(4):  # pad with " a" (one token here; measure again in case words merge)
        n = prompt_tokens(server, text, urls)
        if n % 128 == 0:
            return text
        text += " a" * ((-n) % 128)
    pytest.fail(f"could not pad the prompt to a KV block boundary (at {n} tokens)")


@pytest.mark.parametrize("case", ["block boundary, image", "first token one byte of a character", "whole word"])
def test_the_first_token_comes_from_prefill_and_the_answer_is_agg_s(triton_server, case):
    """llm_decode sends prefill's token at once and decodes on from it; tokens, text and counts equal agg's,
    streamed or not. At a prompt length that fills its last KV block, the first token starts a block prefill has
    no KV for (the connector loads the prompt's KV only); "Hello there" starts with a token that is one byte of a
    character (text only with the next tokens) on the tiny model, "Hi" with a whole one."""
    urls = [data_uri(pattern_image(100, 80, seed=1))] if "image" in case else []
    text = {"block boundary, image": None, "first token one byte of a character": "Hello there",
            "whole word": "Hi"}[case] or block_boundary_prompt(triton_server, urls)
    inputs = build_inputs(text, sampling=GREEDY)
    inputs.image_url = urls or None
    want, agg = tokens(triton_server, "multimodal_agg", inputs)
    for model in ("multimodal", "multimodal_bls"):
        ahead = stage_count(triton_server, "llm_decode", "first_token_ahead")
        got, responses = tokens(triton_server, model, inputs)
        assert got == want, model
        assert [r["text_output"] for r in responses] == [r["text_output"] for r in agg], model
        assert [r["num_output_tokens"] for r in responses] == [r["num_output_tokens"] for r in agg], model
        assert {r["num_input_tokens"] for r in responses} == {agg[0]["num_input_tokens"]}, model
        assert stage_count(triton_server, "llm_decode", "first_token_ahead") == ahead + 1, model
        once = generate_http(triton_server.config.http_url, model, RequestInputs(
            text_input=text, image_url=urls or None, sampling_parameters=GREEDY))
        assert once["token_ids"] == want and once["num_output_tokens"] == len(want), model
        assert once["text_output"] == "".join(r["text_output"] for r in agg), model


def test_images_of_one_shape_in_a_row_each_get_their_own_answer(triton_server, offline_vl):
    """Decode sees zero embeddings: with vLLM's prefix cache on in decode, the second image of a shape after the
    same long text (whole KV blocks over the image) got the first image's KV from decode's own cache and its
    tokens, silently. Each must equal agg's and the plain vLLM run for that image."""
    text = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 30)
    answers = []
    for seed in (21, 22, 23):
        img = pattern_image(100, 80, seed=seed)
        answers.append(all_paths_equal(triton_server, offline_vl, text, [data_uri(img)], [img]))
    assert len({tuple(a) for a in answers}) > 1, "the images must give different answers for this to prove anything"


def test_bls_streams_one_response_per_token(triton_server):
    _, responses = tokens(triton_server, "multimodal_bls", build_inputs("Hello", sampling=GREEDY))
    assert len(responses) == 24
    assert [r["finish_reason"] for r in responses[:-1]] == [""] * 23
    assert [r["num_output_tokens"] for r in responses] == list(range(1, 25))
    once = generate_http(triton_server.config.http_url, "multimodal_bls",
                         RequestInputs(text_input="Hello", sampling_parameters=GREEDY))
    assert once["token_ids"] == [t for r in responses for t in r["token_ids"]]


def test_forged_kv_hand_over_is_refused(triton_server):
    forged = {"prompt": "hi", "prefill": {"kv_transfer_params": {"remote_block_ids": [[1, 2]]},
                                          "num_input_tokens": 2, "media": []},
              "sampling": {"max_tokens": 4}}
    url = f"http://{triton_server.config.http_url}/v2/models/llm_decode/generate"
    req = urllib.request.Request(url, data=json.dumps({"decode_request": json.dumps(forged)}).encode())
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 400
    assert "not signed by this server's prefill" in info.value.read().decode()
    ok = generate_http(triton_server.config.http_url, "multimodal_bls",
                       RequestInputs(text_input="hi", sampling_parameters={"max_tokens": 2}))
    assert len(ok["token_ids"]) == 2


def network_isolated() -> bool:
    """True inside a loopback-only network namespace (bin/test runs the suite in one): no route off the machine,
    so a URL-policy regression gets "network unreachable" instead of reaching another host."""
    import errno
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a UDP connect sends nothing: a route lookup
        try:
            s.connect(("10.1.2.3", 9))
        except OSError as exc:
            return exc.errno == errno.ENETUNREACH
    return False


def _failures(media_dir, port):
    off_machine = [
        ("http://10.1.2.3/a.png", "private"),
        ("http://169.254.169.254/latest/meta-data", "metadata"),
    ] if network_isolated() else []  # only where a policy bug cannot send traffic off the machine
    return [
        (f"http://127.0.0.1:{port}/missing.png", "http 404"),
        (f"http://127.0.0.1:{port}/slow/a.png", "timed out"),
        *off_machine,
        (f"file://{media_dir / 'anim.gif'}", "image format GIF is not allowed"),
        (f"file://{media_dir / 'truncated.png'}", "truncated or corrupt"),
        (f"file://{media_dir / 'huge.png'}", "image is too large"),
    ]


def test_the_suite_runs_without_a_route_off_the_machine():
    """bin/test runs pytest in a loopback-only namespace (and says so in MMT_TEST_IN_NETNS); outside it (a plain
    pytest run) the private-address cases below are left out, and this says so."""
    import os

    if os.environ.get("MMT_TEST_IN_NETNS") != "1":
        pytest.skip("not run by bin/test in a loopback-only network namespace: private-URL cases left out")
    assert network_isolated(), "bin/test's namespace still has a route off the machine"


def test_media_failures_name_the_item_and_leak_nothing(triton_server, media_dir, media_http):
    # Cumulative since the encoder started (another module's outage may have let regions expire): compare.
    expired = metric(triton_server, "mmtriton_embedding_pool", "expired", "encoder_image")
    port = media_http.server_address[1]
    good = data_uri(pattern_image(100, 80, seed=1))
    for url, expect in _failures(media_dir, port):
        for model in PATHS:
            with pytest.raises(InferenceFailed) as info:
                tokens(triton_server, model, RequestInputs(text_input="x", image_url=[good, url],
                                                           sampling_parameters={"max_tokens": 2}, stream=True))
            message = str(info.value)
            assert "image_url[1]" in message and expect.lower() in message.lower(), (model, url, message)
    with pytest.raises(InferenceFailed, match="too many media items"):
        tokens(triton_server, "multimodal_bls", RequestInputs(text_input="x", image_url=[good] * 9, stream=True))
    # Every region the encoder handed out was acknowledged by prefill or released: the pool is empty again.
    assert_pool_drained(triton_server, "encoder_image", expired)
    ok, _ = tokens(triton_server, "multimodal_bls", RequestInputs(text_input="x", image_url=[good],
                                                                 sampling_parameters={"max_tokens": 3}, stream=True))
    assert len(ok) == 3


def test_per_stage_metrics(triton_server):
    """Every stage reports its time on the metrics port (count and summed seconds per stage)."""
    c = triton_server.config
    img = data_uri(pattern_image(100, 80, seed=9))
    for model in ("multimodal_bls", "multimodal_agg"):
        tokens(triton_server, model, RequestInputs(text_input="x", image_url=[img], sampling_parameters=GREEDY,
                                                   stream=True))
    with urllib.request.urlopen(f"http://{c.host}:{c.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for model, stage in [("encoder_image", "image_load"), ("encoder_image", "encode"),
                         ("encoder_image", "embedding_put"), ("llm_prefill", "embedding_fetch"),
                         ("llm_prefill", "first_token"), ("llm_decode", "first_token"), ("llm_decode", "decode"),
                         ("multimodal_agg", "preprocess"), ("multimodal_agg", "first_token")]:
        for family in ("mmtriton_stage_count", "mmtriton_stage_seconds"):
            line = next((ln for ln in text.splitlines() if ln.startswith(family + "{")
                         and f'model="{model}"' in ln and f'item="{stage}"' in ln), None)
            assert line is not None, f"{family} {model}/{stage} missing"
            assert float(line.rsplit(" ", 1)[1]) > 0, line


def test_encoder_batches_concurrent_requests(triton_server, offline_vl):
    """Requests that reach encoder_image together go through the tower in one pass (Triton dynamic batching),
    and every request still gets its own image's tokens."""
    import threading

    imgs = [pattern_image(80 + 9 * i, 60 + 5 * i, seed=30 + i) for i in range(8)]
    want = [offline(offline_vl, "What is this?", [img]) for img in imgs]
    got: list[list[int] | None] = [None] * len(imgs)
    start = threading.Barrier(len(imgs))

    def one(i: int) -> None:
        inputs = build_inputs("What is this?", sampling=GREEDY)
        inputs.image_url = [data_uri(imgs[i])]
        start.wait(timeout=60)
        got[i] = tokens(triton_server, "multimodal", inputs)[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(imgs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert got == want
    time.sleep(GAUGE_SETTLE_S)
    assert metric(triton_server, "mmtriton_encoder_batching", "max_requests", "encoder_image") >= 2
    assert (metric(triton_server, "mmtriton_encoder_batching", "requests", "encoder_image")
            > metric(triton_server, "mmtriton_encoder_batching", "batches", "encoder_image"))


def test_only_the_requested_outputs_come_back(triton_server):
    """A client that asks for token_ids alone gets only token_ids, and the same tokens. (Our models drop the
    other outputs themselves: Triton 2.51's stub drops them without the GIL, which corrupts its heap.)"""
    import queue

    import tritonclient.grpc as grpcclient

    from client import _grpc_inputs

    inputs = build_inputs("Describe the image.", sampling=GREEDY)
    inputs.image_url = [data_uri(pattern_image(64, 48, seed=5))]
    want, _ = tokens(triton_server, "multimodal_agg", inputs)
    for model in PATHS:
        results: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(triton_server.config.grpc_url)
        client.start_stream(callback=lambda result, error, results=results: results.put((result, error)))
        try:
            only_ids = [grpcclient.InferRequestedOutput("token_ids")]
            client.async_stream_infer(model, _grpc_inputs(inputs), outputs=only_ids, enable_empty_final_response=True)
            got, names = [], set()
            while True:
                result, error = results.get(timeout=120)
                assert error is None, f"{model}: {error}"
                response = result.get_response()
                names |= {o.name for o in response.outputs}
                if response.outputs:
                    got += [int(t) for t in result.as_numpy("token_ids").reshape(-1)]
                final = response.parameters.get("triton_final_response")
                if final and final.bool_param:
                    break
        finally:
            client.stop_stream()
            client.close()
        assert names == {"token_ids"}, model
        assert got == want, model


def test_bls_survives_sustained_concurrent_load(triton_server):
    """Hundreds of concurrent BLS requests, all answered alike. Triton 2.51's stub used to segfault here after a
    few hundred (a decoupled BLS iterator freed on its C++ cleanup thread without the GIL; see ReleaseLater),
    and multimodal_bls then failed every request."""
    import threading

    from client import GrpcStreamClient

    clients, per_client = 8, 40
    inputs = build_inputs("Describe the image.", sampling={**GREEDY, "min_tokens": 24})
    inputs.image_url = [data_uri(pattern_image(100, 80, seed=1))]
    answers: list[tuple[int, ...]] = []
    failures: list[str] = []

    def client() -> None:
        with GrpcStreamClient(triton_server.config.grpc_url) as grpc:
            for _ in range(per_client):
                try:
                    answers.append(tuple(t for r in grpc.generate("multimodal_bls", inputs, timeout_s=60)
                                         for t in r["token_ids"]))
                except Exception as exc:  # noqa: BLE001 - counted and shown
                    failures.append(str(exc)[:200])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not failures, f"{len(failures)} of {clients * per_client} failed, e.g. {failures[:2]}"
    assert len(answers) == clients * per_client and len(set(answers)) == 1 and len(answers[0]) == 24
