"""`python -m client` (the command-line front end of client/) against the live servers: every protocol prints
the same answer as the library, --json prints parseable responses, and errors exit non-zero with the message."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from client import RequestInputs, chat_messages, stream_grpc
from conftest import ROOT, pattern_image, png_bytes

pytestmark = pytest.mark.integration
PROMPT = "Describe the image."


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "photo.png"
    path.write_bytes(png_bytes(pattern_image(90, 70, seed=11)))
    return path


@pytest.fixture(scope="module")
def expected(triton_server, image_file) -> str:
    inputs = RequestInputs(messages=chat_messages(PROMPT, [str(image_file)]),
                           sampling_parameters={"max_tokens": 12, "temperature": 0}, stream=True)
    return "".join(r["text_output"] for r in stream_grpc(triton_server.config.grpc_url, "multimodal_agg", inputs))


def test_library_inputs_equal_the_messages_form(triton_server, image_file, expected):
    # build_inputs (text_input + image_url) and chat_messages (messages) describe the same prompt.
    from client import build_inputs

    inputs = build_inputs(PROMPT, [str(image_file)], sampling={"max_tokens": 12, "temperature": 0})
    assert "".join(r["text_output"] for r in stream_grpc(triton_server.config.grpc_url, "multimodal_agg",
                                                         inputs)) == expected


@pytest.mark.parametrize("protocol, extra", [("grpc", []), ("http", []), ("http", ["--no-stream"]),
                                              ("grpc", ["--model", "multimodal"])])
def test_triton_protocols_print_the_answer(triton_server, image_file, expected, protocol, extra):
    url = triton_server.config.grpc_url if protocol == "grpc" else triton_server.config.http_url
    done = run_cli(PROMPT, "--image", str(image_file), "--max-tokens", "12", "--protocol", protocol, "--url", url,
                   *extra)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"


def test_openai_protocol_and_json(openai_server, image_file, expected):
    url = openai_server.base_url.removeprefix("http://").removesuffix("/v1")
    done = run_cli(PROMPT, "--image", str(image_file), "--max-tokens", "12", "--protocol", "openai", "--url", url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"
    done = run_cli(PROMPT, "--image", str(image_file), "--max-tokens", "12", "--protocol", "openai", "--url", url,
                   "--json")
    chunks = [json.loads(line) for line in done.stdout.splitlines()]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == expected


def test_grpc_json_lines(triton_server, image_file, expected):
    done = run_cli(PROMPT, "--image", str(image_file), "--max-tokens", "12", "--url", triton_server.config.grpc_url,
                   "--json")
    responses = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(responses) == 12 and responses[-1]["finish_reason"] == "length"
    assert "".join(r["text_output"] for r in responses) == expected


def test_errors_exit_non_zero_with_the_message(triton_server, tmp_path):
    gif = tmp_path / "anim.gif"
    pattern_image(20, 20, seed=2).save(gif, format="GIF")
    for protocol, url in (("grpc", triton_server.config.grpc_url), ("http", triton_server.config.http_url)):
        done = run_cli("Hi", "--image", str(gif), "--protocol", protocol, "--url", url)
        assert done.returncode == 1
        assert "GIF" in done.stderr and "image_url[0]" in done.stderr, done.stderr
