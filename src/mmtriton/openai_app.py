"""The HTTP side of the OpenAI-compatible server: the FastAPI app (``/v1/chat/completions``, whole or streamed
as Server-Sent Events; ``/v1/models``; ``/health``), request reading and validation, and the cancelling of a
Triton request whose client went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from mmtriton.openai_gateway import TritonGateway
from mmtriton.openai_process import OpenAIServerConfig
from mmtriton.openai_schema import ChatCompletionRequest, Completion, Delta, OpenAIError, sse

log = logging.getLogger("mmtriton.openai")


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
    except (ValueError, RecursionError) as exc:  # a 4300+-digit integer; deep nesting (bench/fuzz.py found both)
        raise OpenAIError(400, f"request body is not acceptable JSON: {type(exc).__name__}") from exc
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
