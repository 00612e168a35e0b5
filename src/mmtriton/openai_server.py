"""An OpenAI-compatible HTTP server in front of tritonserver: ``/v1/chat/completions`` with images, audio and
video, streamed as Server-Sent Events; ``/v1/models``; ``/health``.

    python -m mmtriton.openai_server --triton-url 127.0.0.1:8001 --port 9000

Its own process: it talks to Triton over gRPC streaming (one Triton stream per request, on a small pool of
shared channels), so Triton stays the one place models run. Model ids are Triton model names (those of
``--models`` that Triton reports ready). A client that goes away cancels its Triton request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from mmtriton.openai_schema import ChatCompletionRequest, Completion, Delta, OpenAIError, sse
from mmtriton.protocol import error_class

log = logging.getLogger("mmtriton.openai")

CONTRACT_MODELS = ["multimodal_agg", "multimodal", "multimodal_bls"]


@dataclass
class OpenAIServerConfig:
    triton_url: str = "127.0.0.1:8001"
    host: str = "127.0.0.1"
    port: int = 9000
    # Triton models offered as OpenAI models (those that follow the public contract), when Triton has them ready.
    models: list[str] = field(default_factory=lambda: list(CONTRACT_MODELS))
    # max_tokens when a request gives neither max_tokens nor max_completion_tokens.
    default_max_tokens: int = 256
    # Whole-request limit (Triton stream deadline); a request past it answers 504.
    request_timeout_s: float = 600.0
    # gRPC channels to Triton shared by all requests (each carries many concurrent streams).
    grpc_channels: int = 2
    max_body_bytes: int = 64 * 1024 * 1024
    # How long the list of ready Triton models is trusted before asking Triton again.
    model_list_ttl_s: float = 5.0
    log_level: str = "info"


def _triton_failure(message: str, status_hint: str = "") -> OpenAIError:
    """A Triton error → the OpenAI status its class calls for."""
    if "StatusCode.UNAVAILABLE" in status_hint or "failed to connect" in message.lower():
        return OpenAIError(503, f"Triton is unreachable: {message}")
    if "DEADLINE_EXCEEDED" in status_hint or "deadline exceeded" in message.lower():
        return OpenAIError(504, "the request did not finish in time")
    kind, text = error_class(message)
    if kind == "invalid_input":
        return OpenAIError(400, text)
    if kind == "unavailable":
        return OpenAIError(503, text)
    return OpenAIError(500, message)


class TritonGateway:
    """Streams one contract request through Triton and yields its deltas; knows which models are ready."""

    def __init__(self, config: OpenAIServerConfig):
        import tritonclient.grpc.aio as grpcaio

        self.config = config
        self._clients = [grpcaio.InferenceServerClient(config.triton_url) for _ in range(config.grpc_channels)]
        self._next_client = itertools.cycle(self._clients)
        self._ready: list[str] = []
        self._ready_at = 0.0

    async def close(self) -> None:
        for client in self._clients:
            await client.close()

    async def server_ready(self) -> bool:
        try:
            return await self._clients[0].is_server_ready(client_timeout=5)
        except Exception:  # noqa: BLE001 - any failure to ask is "not ready"
            return False

    async def ready_models(self, refresh: bool = False) -> list[str]:
        if refresh or time.monotonic() - self._ready_at > self.config.model_list_ttl_s:
            try:
                index = await self._clients[0].get_model_repository_index(as_json=True, client_timeout=10)
            except Exception as exc:  # noqa: BLE001 - reported as the server being unreachable
                raise OpenAIError(503, f"Triton at {self.config.triton_url} is unreachable: {exc}") from exc
            ready = {m["name"] for m in index.get("models", []) if m.get("state") == "READY"}
            self._ready = [m for m in self.config.models if m in ready]
            self._ready_at = time.monotonic()
        return self._ready

    async def check_model(self, model: str) -> None:
        if model in await self.ready_models():
            return
        ready = await self.ready_models(refresh=True)  # it may have just been loaded
        if model not in ready:
            raise OpenAIError(404, f"model {model!r} not found; available: {', '.join(ready) or 'none'}", "model")

    async def generate(self, model: str, inputs: dict[str, np.ndarray], request_id: str) -> AsyncIterator[Delta]:
        import grpc
        import tritonclient.grpc.aio as grpcaio
        from tritonclient.utils import InferenceServerException

        tensors = []
        for name, array in inputs.items():
            tensor = grpcaio.InferInput(name, list(array.shape), "BOOL" if array.dtype == bool else "BYTES")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)

        done = asyncio.Event()

        async def one_request():
            yield {"model_name": model, "inputs": tensors, "request_id": request_id}
            # Our side of the stream stays open until the answer is complete (as tritonclient's sync streams
            # do): a cancel that followed an early half-close did not always reach the model.
            await done.wait()

        call = next(self._next_client).stream_infer(one_request(), stream_timeout=self.config.request_timeout_s)
        finished = False
        try:
            async for result, error in call:
                if error is not None:
                    raise _triton_failure(error.message(), str(error.status()))
                delta = _delta(result)
                finished = bool(delta.finish_reason)
                yield delta
                if finished:
                    return
        except InferenceServerException as exc:
            raise _triton_failure(exc.message(), str(exc.status())) from exc
        except grpc.aio.AioRpcError as exc:
            raise _triton_failure(exc.details() or str(exc), str(exc.code())) from exc
        finally:
            if not finished:
                call.cancel()  # the client went away or the request failed: Triton cancels its request
                log.debug("%s: Triton stream cancelled", request_id)
            done.set()
        raise OpenAIError(500, f"{model} ended the stream without a final response")


def _delta(result) -> Delta:
    def text(name: str) -> str:
        array = result.as_numpy(name)
        return "" if array is None else b"".join(array.reshape(-1)).decode("utf-8", errors="replace")

    def count(name: str) -> int:
        array = result.as_numpy(name)
        return 0 if array is None else int(array.reshape(-1)[0])

    ids = result.as_numpy("token_ids")
    return Delta(text("text_output"), [] if ids is None else ids.reshape(-1).tolist(), text("finish_reason"),
                 count("num_input_tokens"), count("num_output_tokens"))


async def _until_disconnected(receive) -> None:
    """Returns when the HTTP client goes away (the body has been read, so receive() waits for that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """A streaming response that ends its generator, and so the Triton request, as soon as the client goes.

    Starlette (ASGI 2.4) notices a disconnect only on its next write and then leaves the generator to the
    garbage collector: the Triton request would run on until then. Here a disconnect also ends a stream that is
    waiting for its next token, and the generator is always closed.
    """

    def __init__(self, content, completion_id: str, **kwargs):
        super().__init__(content, **kwargs)
        self.completion_id = completion_id

    async def __call__(self, scope, receive, send) -> None:
        streaming = asyncio.ensure_future(super().__call__(scope, receive, send))
        watcher = asyncio.ensure_future(_until_disconnected(receive))
        try:
            await asyncio.wait({streaming, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not streaming.done():
                log.info("%s: client disconnected mid-stream, request cancelled", self.completion_id)
        finally:
            watcher.cancel()
            if not streaming.done():
                streaming.cancel()
            with contextlib.suppress(asyncio.CancelledError, ClientDisconnect, OSError):
                await streaming
            await self.body_iterator.aclose()


def create_app(config: OpenAIServerConfig):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.gateway = TritonGateway(config)
        try:
            yield
        finally:
            await app.state.gateway.close()

    app = FastAPI(title="mmtriton OpenAI-compatible API", lifespan=lifespan)

    @app.exception_handler(OpenAIError)
    async def openai_error(_request: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/health")
    async def health(request: Request):
        if await request.app.state.gateway.server_ready():
            return {"status": "ok"}
        return JSONResponse({"status": "triton not ready"}, status_code=503)

    @app.get("/v1/models")
    async def models(request: Request):
        ready = await request.app.state.gateway.ready_models()
        return {"object": "list",
                "data": [{"id": m, "object": "model", "created": 0, "owned_by": "mmtriton"} for m in ready]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        gateway: TritonGateway = request.app.state.gateway
        chat = await _read_request(request, config.max_body_bytes)
        await gateway.check_model(chat.model)
        completion = Completion(chat.model, chat.return_token_ids)
        t0 = time.perf_counter()
        deltas = gateway.generate(chat.model, chat.triton_inputs(config.default_max_tokens), completion.id)
        if not chat.stream:
            if not await _collect(request, deltas, completion):
                return Response(status_code=499)  # nobody is listening (nginx's "client closed request")
            _log_done(completion, t0)
            return completion.response()
        # The first response decides the status: bad media is a 400, not an error inside a 200 stream.
        try:
            first = await anext(deltas)
        except StopAsyncIteration:
            raise OpenAIError(500, f"{chat.model} sent no response") from None
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        return _EventStream(_events(completion, first, deltas, include_usage, t0), completion.id,
                            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


async def _read_request(request, max_body_bytes: int) -> ChatCompletionRequest:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body_bytes:
        raise OpenAIError(413, f"request body of {int(declared)} bytes exceeds {max_body_bytes}")
    body = await request.body()
    if len(body) > max_body_bytes:
        raise OpenAIError(413, f"request body of {len(body)} bytes exceeds {max_body_bytes}")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise OpenAIError(400, "request body must be a JSON object")
    try:
        chat = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or None
        raise OpenAIError(400, f"{where}: {err['msg']}" if where else err["msg"], where) from exc
    problem = chat.unsupported()
    if problem:
        raise OpenAIError(400, problem)
    ignored = sorted(set(chat.model_extra or ()) - {"user", "metadata", "store", "parallel_tool_calls"})
    if ignored:
        log.debug("ignoring request fields %s", ", ".join(ignored))
    return chat


async def _collect(request, deltas: AsyncIterator[Delta], completion: Completion) -> bool:
    """Gather a whole answer, cancelling the Triton request if the HTTP client goes away meanwhile (False)."""

    async def gather():
        async for delta in deltas:
            completion.add(delta)

    work = asyncio.ensure_future(gather())
    watcher = asyncio.ensure_future(_until_disconnected(request.receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()  # the client left: closing the stream cancels the Triton request
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        log.info("%s: client disconnected, request cancelled", completion.id)
        return False
    work.result()
    return True


async def _events(completion: Completion, first: Delta, deltas: AsyncIterator[Delta], include_usage: bool,
                  t0: float) -> AsyncIterator[bytes]:
    try:
        yield sse(completion.first_chunk())
        completion.add(first)
        yield sse(completion.delta_chunk(first))
        async for delta in deltas:
            completion.add(delta)
            yield sse(completion.delta_chunk(delta))
        if include_usage:
            yield sse(completion.usage_chunk())
        _log_done(completion, t0)
    except OpenAIError as exc:
        # Headers are sent: the error goes into the stream, as vLLM's server does.
        yield sse(exc.body())
    finally:
        # Also reached when Starlette cancels us because the client disconnected: closing the generator
        # cancels the Triton request.
        await deltas.aclose()
    yield sse("[DONE]")


def _log_done(completion: Completion, t0: float) -> None:
    log.info("%s %s: %d prompt + %d completion tokens in %.1f ms (%s)", completion.id, completion.model,
             completion.prompt_tokens, completion.completion_tokens, (time.perf_counter() - t0) * 1000,
             completion.finish_reason)


class OpenAIServerProcess:
    """``python -m mmtriton.openai_server`` as a child process: for the launcher, the tests and the benchmarks."""

    def __init__(self, config: OpenAIServerConfig, log_file: Path | None = None):
        self.config = config
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}/v1"

    def command(self) -> list[str]:
        c = self.config
        return [sys.executable, "-m", "mmtriton.openai_server", "--triton-url", c.triton_url, "--host", c.host,
                "--port", str(c.port), "--models", ",".join(c.models), "--default-max-tokens",
                str(c.default_max_tokens), "--request-timeout", str(c.request_timeout_s),
                "--grpc-channels", str(c.grpc_channels), "--log-level", c.log_level]

    def start(self) -> None:
        out = subprocess.DEVNULL
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "w")  # noqa: SIM115 - the child owns it from here
        self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)

    def wait_ready(self, timeout_s: float = 60.0, triton_ready: bool = True) -> None:
        """Until /health answers (200 if ``triton_ready``: Triton behind it is ready too)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the OpenAI server exited with {self.process.returncode}; log: {self.log_file}")
            try:
                with urllib.request.urlopen(f"http://{self.config.host}:{self.config.port}/health", timeout=5):
                    return
            except urllib.error.HTTPError:
                if not triton_ready:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the OpenAI server was not ready within {timeout_s:.0f} s; log: {self.log_file}")

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout_s)


def main(argv: list[str] | None = None) -> int:
    defaults = OpenAIServerConfig()
    p = argparse.ArgumentParser(prog="python -m mmtriton.openai_server", description=__doc__.splitlines()[0])
    p.add_argument("--triton-url", default=defaults.triton_url, help="Triton gRPC host:port")
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=defaults.port)
    p.add_argument("--models", default=",".join(defaults.models),
                   help="comma-separated Triton models to offer (those ready in Triton are listed)")
    p.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens)
    p.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s, help="seconds")
    p.add_argument("--grpc-channels", type=int, default=defaults.grpc_channels)
    p.add_argument("--log-level", default=defaults.log_level)
    args = p.parse_args(argv)
    config = OpenAIServerConfig(
        triton_url=args.triton_url, host=args.host, port=args.port,
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        default_max_tokens=args.default_max_tokens, request_timeout_s=args.request_timeout,
        grpc_channels=args.grpc_channels,
    )
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("OpenAI-compatible API on http://%s:%d/v1 → Triton gRPC %s (models: %s)", config.host, config.port,
             config.triton_url, ", ".join(config.models))
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=args.log_level,
                access_log=False, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
