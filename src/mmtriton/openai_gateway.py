"""The Triton side of the OpenAI-compatible server: each request is one Triton gRPC stream, on a small pool of
shared channels; the list of ready Triton models; Triton errors mapped to OpenAI statuses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator

import numpy as np

from mmtriton.openai_process import OpenAIServerConfig
from mmtriton.openai_schema import Delta, OpenAIError
from mmtriton.protocol import error_class
from mmtriton.wire import DecodeCancel

log = logging.getLogger("mmtriton.openai")


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
        self._ends_in_decode: dict[str, bool] = {}
        self._pending: set[asyncio.Task] = set()

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
                task = asyncio.ensure_future(self._cancel_ensemble_decode(model, request_id))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
            done.set()
        raise OpenAIError(500, f"{model} ended the stream without a final response")

    async def _cancel_ensemble_decode(self, model: str, request_id: str) -> None:
        """Triton 2.51's ensemble does not pass a cancel on to a step that is already running (it cancels only
        the steps it schedules afterwards), so an ensemble's llm_decode would generate to the end. llm_decode
        knows the decode by our request id (the ensemble gives it to every step): tell it."""
        try:
            if not await self._ends_in_llm_decode(model):
                return
            import tritonclient.grpc.aio as grpcaio

            cancel = np.array([DecodeCancel(request_id=request_id).model_dump_json().encode()], dtype=object)
            tensor = grpcaio.InferInput("decode_cancel", [1], "BYTES")
            tensor.set_data_from_numpy(cancel)

            async def one_request():
                yield {"model_name": "llm_decode", "inputs": [tensor]}

            call = self._clients[0].stream_infer(one_request(), stream_timeout=10)
            async for _result, error in call:  # one empty final answer
                if error is not None:
                    raise RuntimeError(error.message())
                break
            call.cancel()
            log.info("%s: llm_decode told to stop (the client went away)", request_id)
        except Exception as exc:  # noqa: BLE001 - the decode then runs to its end: wasteful, not wrong
            log.warning("%s: could not cancel %s's decode: %s", request_id, model, exc)

    async def _ends_in_llm_decode(self, model: str) -> bool:
        if model not in self._ends_in_decode:
            config = (await self._clients[0].get_model_config(model, as_json=True, client_timeout=10))["config"]
            steps = config.get("ensemble_scheduling", {}).get("step", [])
            self._ends_in_decode[model] = any(step.get("model_name") == "llm_decode" for step in steps)
        return self._ends_in_decode[model]


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
