"""A small client library for the multimodal models over Triton gRPC (streaming) and HTTP.

    from client import build_inputs, stream_grpc
    for r in stream_grpc("127.0.0.1:8001", "multimodal_agg", build_inputs("Describe it.", images=["cat.png"])):
        print(r["text_output"], end="", flush=True)

Also: ``stream_http`` (Triton's generate_stream), ``generate_http`` (one response), ``GrpcStreamClient`` (one
connection for many requests), ``chat_messages`` (OpenAI ``messages`` for the ``messages`` input or the
OpenAI-compatible server), ``cancel_decode`` (stop the decode of a cancelled ``multimodal`` request).
``python -m client --help`` is the command-line front end.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import queue
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MEDIA_MIME = {"image": "image/png", "audio": "audio/wav", "video": "video/mp4"}


class InferenceFailed(RuntimeError):
    """The server answered with an error (its message says what was wrong)."""


def to_url(item: str, kind: str) -> str:
    """A URL stays as it is; a local path becomes a data: URI."""
    if item.split(":", 1)[0] in ("http", "https", "data", "file"):
        return item
    path = Path(item)
    mime = mimetypes.guess_type(path.name)[0] or MEDIA_MIME[kind]
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


@dataclass
class RequestInputs:
    """The public contract's inputs (docs/contract.md); None = left out."""

    text_input: str | None = None
    messages: list[dict[str, Any]] | None = None
    image_url: list[str] | None = None
    audio_url: list[str] | None = None
    video_url: list[str] | None = None
    sampling_parameters: dict[str, Any] | None = None
    stream: bool | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self.text_input is not None:
            out["text_input"] = np.array([self.text_input.encode()], dtype=np.object_)
        if self.messages is not None:
            out["messages"] = np.array([json.dumps(self.messages).encode()], dtype=np.object_)
        for name in ("image_url", "audio_url", "video_url"):
            urls = getattr(self, name)
            if urls:
                out[name] = np.array([u.encode() for u in urls], dtype=np.object_)
        if self.sampling_parameters is not None:
            out["sampling_parameters"] = np.array([json.dumps(self.sampling_parameters).encode()], dtype=np.object_)
        if self.stream is not None:
            out["stream"] = np.array([self.stream], dtype=bool)
        return out


def build_inputs(
    text: str,
    images: Sequence[str] = (),
    audios: Sequence[str] = (),
    videos: Sequence[str] = (),
    sampling: dict[str, Any] | None = None,
    stream: bool = True,
) -> RequestInputs:
    return RequestInputs(
        text_input=text,
        image_url=[to_url(i, "image") for i in images] or None,
        audio_url=[to_url(a, "audio") for a in audios] or None,
        video_url=[to_url(v, "video") for v in videos] or None,
        sampling_parameters=sampling,
        stream=stream,
    )


def chat_messages(text: str, images: Sequence[str] = (), audios: Sequence[str] = (), videos: Sequence[str] = (),
                  system: str | None = None) -> list[dict[str, Any]]:
    """OpenAI chat ``messages``: media parts (images, audio, video, in that order) before the text. Local audio
    files become ``input_audio`` parts (OpenAI's form for inline audio), audio URLs ``audio_url`` parts."""
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": to_url(i, "image")}} for i in images]
    for a in audios:
        url = to_url(a, "audio")
        if url.startswith("data:") and url != a:
            fmt = Path(a).suffix.lstrip(".").lower() or "wav"
            parts.append({"type": "input_audio", "input_audio": {"data": url.split(",", 1)[1], "format": fmt}})
        else:
            parts.append({"type": "audio_url", "audio_url": {"url": url}})
    parts += [{"type": "video_url", "video_url": {"url": to_url(v, "video")}} for v in videos]
    parts.append({"type": "text", "text": text})
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": parts}]


def _decode(result) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("text_output", "finish_reason"):
        arr = result.as_numpy(name)
        out[name] = "" if arr is None else b"".join(arr.reshape(-1)).decode("utf-8", errors="replace")
    ids = result.as_numpy("token_ids")
    out["token_ids"] = [] if ids is None else [int(t) for t in ids.reshape(-1)]
    for name in ("num_input_tokens", "num_output_tokens"):
        arr = result.as_numpy(name)
        out[name] = None if arr is None else int(arr.reshape(-1)[0])
    return out


def _grpc_inputs(inputs: RequestInputs):
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, arr in inputs.arrays().items():
        dtype = "BOOL" if arr.dtype == bool else "BYTES"
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        tensors.append(t)
    return tensors


class GrpcStreamClient:
    """One gRPC connection and bidirectional stream, reused for requests sent one after another."""

    def __init__(self, url: str):
        import tritonclient.grpc as grpcclient

        self._results: queue.Queue = queue.Queue()
        self._client = grpcclient.InferenceServerClient(url)
        self._client.start_stream(callback=lambda result=None, error=None: self._results.put((result, error)))

    def generate(self, model: str, inputs: RequestInputs, timeout_s: float = 300.0,
                 request_id: str | None = None) -> Iterator[dict[str, Any]]:
        """Send one request; yield each response as a dict until the final one."""
        self._client.async_stream_infer(
            model, _grpc_inputs(inputs), request_id=request_id or uuid.uuid4().hex, enable_empty_final_response=True
        )
        while True:
            try:
                result, error = self._results.get(timeout=timeout_s)
            except queue.Empty as exc:
                raise TimeoutError(f"no response from {model} within {timeout_s:.0f} s") from exc
            if error is not None:
                raise InferenceFailed(str(error))
            response = result.get_response()
            final = response.parameters.get("triton_final_response")
            if response.outputs:
                yield _decode(result)
            if final and final.bool_param:
                return

    def close(self) -> None:
        self._client.stop_stream(cancel_requests=True)
        self._client.close()

    def __enter__(self) -> GrpcStreamClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cancel_decode(url: str, request_id: str, timeout_s: float = 10.0) -> None:
    """After cancelling a request to the ``multimodal`` ensemble, stop its decode too. Triton 2.51's ensemble
    does not pass a cancel on to a step that is already running, so llm_decode would generate on to
    ``max_tokens`` for nobody. This sends llm_decode a ``decode_cancel`` for the request's id (the id given to
    ``generate``; docs/stage-wire.md, DecodeCancel)."""
    import tritonclient.grpc as grpcclient

    payload = np.array([json.dumps({"request_id": request_id}).encode()], dtype=object)
    tensor = grpcclient.InferInput("decode_cancel", [1], "BYTES")
    tensor.set_data_from_numpy(payload)
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result=None, error=None: answers.put(error))
        client.async_stream_infer("llm_decode", [tensor], enable_empty_final_response=True)
        try:
            error = answers.get(timeout=timeout_s)
        except queue.Empty as exc:
            raise TimeoutError(f"llm_decode did not answer the cancel within {timeout_s:.0f} s") from exc
        if error is not None:
            raise InferenceFailed(str(error))
    finally:
        client.stop_stream()
        client.close()


def stream_grpc(url: str, model: str, inputs: RequestInputs, timeout_s: float = 300.0,
                request_id: str | None = None) -> Iterator[dict[str, Any]]:
    """Send one request on a connection of its own; yield each response until the final one."""
    with GrpcStreamClient(url) as client:
        yield from client.generate(model, inputs, timeout_s, request_id)


def _http_body(inputs: RequestInputs, stream: bool) -> bytes:
    """The generate extension's JSON: one value per scalar input, lists for the *_url inputs."""
    body: dict[str, Any] = {}
    for name, arr in inputs.arrays().items():
        if name == "stream":
            continue
        values = [v.decode() if isinstance(v, bytes) else v for v in arr.reshape(-1).tolist()]
        body[name] = values if name.endswith("_url") else values[0]
    body["stream"] = stream
    return json.dumps(body).encode()


def _http_post(url: str, path: str, body: bytes, timeout_s: float):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://{url}{path}", data=body, headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        raise InferenceFailed(f"HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc


def generate_http(url: str, model: str, inputs: RequestInputs, timeout_s: float = 300.0) -> dict[str, Any]:
    """One non-streaming request through Triton's HTTP generate endpoint."""
    with _http_post(url, f"/v2/models/{model}/generate", _http_body(inputs, stream=False), timeout_s) as r:
        return json.loads(r.read())


def stream_http(url: str, model: str, inputs: RequestInputs, timeout_s: float = 300.0) -> Iterator[dict[str, Any]]:
    """A streamed request through Triton's HTTP generate_stream endpoint (Server-Sent Events): yields each
    response as a dict (the contract's outputs)."""
    with _http_post(url, f"/v2/models/{model}/generate_stream", _http_body(inputs, stream=True), timeout_s) as r:
        for raw in r:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise InferenceFailed(str(event["error"]))
            yield event
