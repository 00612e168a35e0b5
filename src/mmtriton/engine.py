"""vLLM engine adapter: an ``AsyncLLM`` on its own event-loop thread, driven from any thread.

Triton calls ``execute`` on its own thread and must return quickly (decoupled models), so requests are handed
to the engine loop with ``run_coroutine_threadsafe``. Outputs go to a caller-supplied ``emit`` callback that
must not block (the Triton adapter puts them on a queue drained by a response thread), so the engine loop never
waits on a client. A request whose client went away is aborted in vLLM.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mmtriton import vllm_metrics
from mmtriton.families import checkpoint_config
from mmtriton.metrics import StageTimes
from mmtriton.protocol import InvalidInput, SamplingOptions
from mmtriton.settings import Settings

log = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    """The vLLM engine died; every request fails until the model is restarted."""


class RequestFailed(RuntimeError):
    """vLLM ended a request with an error of its own (e.g. a KV load failure): answered as INTERNAL with the
    cause, never as an answer with no tokens."""


# vLLM finish reasons that are failures, not answers (vllm.v1.engine.FinishReason: "error" is a retryable
# request-level internal error such as a KV load failure; "abort" without our client's cancel means the engine
# dropped the request).
FAILED_FINISH_REASONS = ("error", "abort")


def generate_error(exc: BaseException) -> Exception:
    """What an ``EngineGenerateError`` from ``AsyncLLM.generate`` means for the client. vLLM raises it empty,
    with the real error as its cause: a processor ``ValueError`` (e.g. "audio too short") is the client's
    input; anything else is ours, named."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ValueError):
        return InvalidInput(str(cause))
    if cause is None:
        return RequestFailed(f"vLLM failed the request ({type(exc).__name__})")
    return RequestFailed(f"vLLM failed the request: {type(cause).__name__}: {cause}")


@dataclass
class GenerationChunk:
    """One response's worth of output (a step when streaming; everything otherwise)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "" while more follows
    num_input_tokens: int
    num_output_tokens: int
    finished: bool
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_dtype(settings: Settings) -> str:
    """``auto`` means the checkpoint's own dtype.

    vLLM's own "auto" runs a float32 checkpoint in bfloat16 on CPU, which changes greedy tokens against HF
    float32 (seen on the tiny models from the third token on); serving what the checkpoint says keeps every
    path equal. An explicit setting (e.g. bfloat16 for speed) is passed through.
    """
    if settings.dtype != "auto":
        return settings.dtype
    config = checkpoint_config(settings.model_path())
    for source in (config, config.get("text_config") or {}):
        dtype = source.get("dtype") or source.get("torch_dtype")
        if isinstance(dtype, str):
            return dtype
    return "auto"


def engine_args_for(settings: Settings, limit_mm_per_prompt: dict[str, int], **overrides: Any) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for one engine, from the settings."""
    args: dict[str, Any] = dict(
        model=settings.model_path(),
        dtype=resolve_dtype(settings),
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        enforce_eager=True,  # CPU: no graphs to capture; faster start
        limit_mm_per_prompt=limit_mm_per_prompt,
        # Stays True: our stat logger (VllmEngine passes stat_loggers) turns vLLM's stats on by itself, without
        # vLLM's default LoggingStatLogger and its periodic throughput lines (mmtriton.vllm_metrics).
        disable_log_stats=True,
        seed=0,
    )
    args.update(overrides)
    return args


def kv_transfer_args(role: str) -> dict[str, Any]:
    """Engine args for one side of prefill → decode through vLLM's NixlConnector (CPU buffers here)."""
    from vllm.config import KVTransferConfig

    from mmtriton import kv_connector

    return dict(
        kv_transfer_config=KVTransferConfig(
            kv_connector=kv_connector.CONNECTOR_NAME,
            kv_connector_module_path=kv_connector.MODULE_PATH,
            kv_role=role,
            kv_buffer_device="cpu",
        ),
        # Embeddings only: the encoders send them; prefill and decode never see pixels (and, with media limits
        # of 0, build no vision tower: disagg.embeddings_only_limits).
        enable_mm_embeds=True,
    )


def fresh_engine_identity(engine_args: dict[str, Any]) -> dict[str, Any]:
    """Engine args for a restarted engine: a new KV-connector engine id. NixlConnector peers cache each other by
    engine id; a restarted prefill that kept its old id made decode reuse the dead agent for good ("remote agent
    … was disconnected", every request ending with finish_reason "error"). A new id makes decode hand-shake anew."""
    import copy
    import uuid

    config = engine_args.get("kv_transfer_config")
    if config is None:
        return engine_args
    config = copy.deepcopy(config)
    config.engine_id = str(uuid.uuid4())
    return {**engine_args, "kv_transfer_config": config}


def to_vllm_sampling(options: SamplingOptions, **extra: Any):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=options.max_tokens,
        min_tokens=options.min_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k if options.top_k > 0 else 0,
        seed=options.seed,
        stop=options.stop or None,
        ignore_eos=options.ignore_eos,
        # Always deltas: streaming sends them as they are, non-streaming accumulates them, and either way
        # every engine step reaches us, so a cancelled client is noticed within a step.
        output_kind=RequestOutputKind.DELTA,
        **extra,
    )


CANCEL_POLL_S = 0.1


class FirstOutputTimeout(RuntimeError):
    """No output for a request within its first-output deadline (llm_decode: the KV cache never arrived)."""


async def _stall_after(timeout_s: float, started: Callable[[], bool], task: asyncio.Task) -> bool:
    """Cancels ``task`` if it has no output after ``timeout_s``; True then."""
    await asyncio.sleep(timeout_s)
    if started():
        return False
    task.cancel()
    return True


async def _cancel_when(cancelled: Callable[[], bool], task: asyncio.Task) -> bool:
    """Cancels ``task`` once ``cancelled()`` says the client has gone; True then."""
    while not cancelled():
        await asyncio.sleep(CANCEL_POLL_S)
    task.cancel()
    return True


# What VllmEngine does when its engine dies (Settings.engine_on_death).
ENGINE_DEATH_POLICIES = ("restart", "exit")
# Under "exit": how long the dying stub waits after the engine's death was seen, so the error responses of the
# requests that were in flight (raised at once by vLLM's output handler) leave the stub before it goes.
EXIT_GRACE_S = 1.0
# ... then how long it waits at most for those responses to be handed to Triton (VllmEngine.before_exit).
EXIT_DRAIN_S = 15.0
ENGINE_DEATH_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" - the supervisor's log shows it


class VllmEngine:
    """Owns one AsyncLLM and the thread whose event loop runs it."""

    def __init__(self, engine_args: dict[str, Any], env: dict[str, str] | None = None,
                 times: StageTimes | None = None, on_death: str = "restart"):
        if on_death not in ENGINE_DEATH_POLICIES:
            raise ValueError(f"engine_on_death {on_death!r} is not one of {', '.join(ENGINE_DEATH_POLICIES)}")
        self.engine_args = engine_args
        self.on_death = on_death
        self.env = env or {}
        # "first_token" (request in → first output) and "decode" (per token after the first).
        self.times = times or StageTimes()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.llm = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        # Engine-death recovery: a watchdog on the loop replaces a dead AsyncLLM with a new one.
        self.restarts = 0
        self.restarting = False
        self.cancelled = 0  # requests whose client went away (aborted in vLLM)
        self.watch_interval_s = 1.0
        # Requests that got no first output in time, in a row (reset by any first output); at stalls_to_restart
        # the engine counts as dead (wedged: e.g. a KV connector that never gets its KV).
        self.stalls = 0
        self.stalls_to_restart = 0  # 0: never
        self.wedged = False
        # Under "exit": called with a timeout before the process ends; each returns whether it finished
        # (triton_io.ResponseThread.drain: the error responses of the requests in flight must leave first).
        self.before_exit: list[Callable[[float], bool]] = []

    # ---- life cycle -------------------------------------------------------------------------------------
    def start(self, timeout_s: float) -> None:
        os.environ.update(self.env)  # engine processes are spawned from here and inherit it
        self._thread = threading.Thread(target=self._thread_main, name="vllm-engine-loop", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"vLLM engine did not start within {timeout_s:.0f} s")
        if self._start_error is not None:
            raise RuntimeError(f"vLLM engine failed to start: {self._start_error}") from self._start_error

    def _thread_main(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._stop = asyncio.Event()
        try:
            t0 = time.monotonic()
            self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_args),
                                                 stat_loggers=vllm_metrics.stat_loggers_for(self))
            log.info("vLLM engine for %s started in %.1f s", self.engine_args.get("model"), time.monotonic() - t0)
        except BaseException as exc:  # reported to start()'s caller
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        watchdog = asyncio.create_task(self._watch())
        await self._stop.wait()
        watchdog.cancel()
        self.llm.shutdown()

    async def _watch(self) -> None:
        """Replace a dead engine (its process crashed or was killed) or a wedged one (``stalls_to_restart``
        requests in a row without a first output): requests fail with EngineDead meanwhile."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        while True:
            await asyncio.sleep(self.watch_interval_s)
            if not (self.llm.errored or self.wedged) or self._stop.is_set():  # alive, or going away anyway
                continue
            if self.wedged:
                log.error("vLLM engine for %s is wedged: %d requests in a row got no first output in time",
                          self.engine_args.get("model"), self.stalls)
            self.wedged, self.stalls = False, 0
            self._fail_in_flight()
            if self.on_death == "exit":
                await self._exit_for_reload()
            self.restarting = True
            log.error("vLLM engine for %s died; restarting it", self.engine_args.get("model"))
            try:
                self.llm.shutdown()
            except Exception:  # it is dead already; what matters is the new one
                log.exception("shutting down the dead engine failed")
            t0 = time.monotonic()
            try:
                # Blocks this loop while the engine starts: requests queued meanwhile run on the new engine.
                # The new engine's stat logger records into the same store (vllm_metrics.stats_of).
                self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**fresh_engine_identity(self.engine_args)),
                                                     stat_loggers=vllm_metrics.stat_loggers_for(self))
                self.restarts += 1
                log.warning("vLLM engine restarted in %.1f s (restart %d)", time.monotonic() - t0, self.restarts)
            except Exception:
                log.exception("restarting the vLLM engine failed; retrying")
                continue
            finally:
                self.restarting = False

    def _fail_in_flight(self) -> None:
        """End every request in flight with EngineDeadError now. vLLM marks its client dead (``errored``) at once
        but hands the error to the requests only after its engine manager's shutdown, which waits up to
        VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS (5 s) for the engine's leftover processes: a stub that ended sooner
        left its clients with Triton's "Stub process is not healthy" instead of our UNAVAILABLE (seen in CI)."""
        from vllm.v1.engine.exceptions import EngineDeadError

        processor = getattr(self.llm, "output_processor", None)
        if processor is None:
            return
        try:
            processor.propagate_error(EngineDeadError())  # what vLLM's output handler does when it sees the death
        except Exception:  # the requests still get vLLM's own error later
            log.exception("failing the requests in flight failed")

    async def _exit_for_reload(self) -> None:
        """Engine death under a supervisor: end this stub process, so the supervisor reloads the model. While it
        reloads, Triton reports the model (and every ensemble and BLS model in front of it: not loaded) not ready
        — the only way a Python-backend model can become unready in Triton 2.51."""
        self.restarting = True  # alive = False: requests arriving in the grace get EngineDead (UNAVAILABLE)
        log.error("vLLM engine for %s died; ending this stub (pid %d, exit %d) for the supervisor to reload the "
                  "model (engine_on_death=exit)", self.engine_args.get("model"), os.getpid(), ENGINE_DEATH_EXIT_CODE)
        await asyncio.sleep(EXIT_GRACE_S)
        for drain in self.before_exit:
            t0 = time.monotonic()
            # Off the loop: the generate() coroutines still failing their requests run on it meanwhile.
            if not await asyncio.to_thread(drain, EXIT_DRAIN_S):
                log.error("responses still unsent after %.0f s; ending the stub anyway", EXIT_DRAIN_S)
            elif time.monotonic() - t0 > 0.1:
                log.warning("waited %.1f s for the responses in flight to leave", time.monotonic() - t0)
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        os._exit(ENGINE_DEATH_EXIT_CODE)  # no atexit / finalize: the engine is gone and Triton's side is dead

    def shutdown(self, timeout_s: float = 30.0) -> None:
        if self.loop is not None and self._stop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return (self.llm is not None and not self.llm.errored and not self.restarting and not self.wedged
                and self._thread is not None and self._thread.is_alive())

    # ---- requests ---------------------------------------------------------------------------------------
    def submit(self, coro: Awaitable[Any]) -> concurrent.futures.Future:
        """Run a coroutine on the engine loop (from any thread)."""
        if self.loop is None:
            raise EngineDead("engine not started")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def generate(
        self,
        request_id: str,
        prompt: Any,
        sampling_params: Any,
        stream: bool,
        emit: Callable[[GenerationChunk], None],
        cancelled: Callable[[], bool],
        first_output_timeout_s: float | None = None,
    ) -> GenerationChunk | None:
        """Generate on the engine loop; ``emit`` gets one chunk per step (stream) or one at the end.

        Returns the final chunk, or None when the client cancelled (the vLLM request is aborted then). With
        ``first_output_timeout_s``, a request without output by then is aborted and raises FirstOutputTimeout.
        """
        if not self.alive:
            raise EngineDead("the vLLM engine is not running (restarting after a crash)")
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        text_parts: list[str] = []
        token_ids: list[int] = []
        num_input = 0
        start = time.perf_counter()
        first: float | None = None
        # Asked between outputs too: a client that leaves during a long prefill (or while the engine is slow)
        # is noticed without waiting for the next token.
        watcher = asyncio.ensure_future(_cancel_when(cancelled, asyncio.current_task()))
        staller = (asyncio.ensure_future(_stall_after(first_output_timeout_s, lambda: first is not None,
                                                      asyncio.current_task()))
                   if first_output_timeout_s else None)
        try:
            async for out in self.llm.generate(prompt, sampling_params, request_id):
                if first is None:
                    first = time.perf_counter()
                    self.times.add("first_token", first - start)
                    self.stalls = 0
                if cancelled():
                    await self.llm.abort(request_id)
                    self.cancelled += 1
                    return None
                completion = out.outputs[0]
                if out.finished and completion.finish_reason in FAILED_FINISH_REASONS:
                    self._raise_failed(completion.finish_reason, len(token_ids) + len(completion.token_ids))
                num_input = len(out.prompt_token_ids or [])
                token_ids.extend(completion.token_ids)
                chunk = GenerationChunk(
                    text=completion.text,
                    token_ids=list(completion.token_ids),
                    finish_reason=(completion.finish_reason or "") if out.finished else "",
                    num_input_tokens=num_input,
                    num_output_tokens=len(token_ids),
                    finished=out.finished,
                    extra={"kv_transfer_params": out.kv_transfer_params} if out.kv_transfer_params else {},
                )
                if stream:
                    emit(chunk)
                else:
                    text_parts.append(completion.text)
                if out.finished:
                    if len(token_ids) > 1:
                        self.times.add("decode", time.perf_counter() - first, count=len(token_ids) - 1)
                    if not stream:
                        chunk.text, chunk.token_ids = "".join(text_parts), token_ids
                        emit(chunk)
                    return chunk
        except EngineDeadError as exc:
            raise EngineDead(f"the vLLM engine died: {exc}") from exc
        except EngineGenerateError as exc:
            if not self.alive:
                raise EngineDead(f"the vLLM engine died during the request: {generate_error(exc)}") from exc
            raise generate_error(exc) from exc
        except (ValueError, VLLMClientError) as exc:
            # vLLM validates prompts (length, media count) with ValueError: the client's fault.
            raise InvalidInput(str(exc)) from exc
        except asyncio.CancelledError:
            await self.llm.abort(request_id)
            if watcher.done() and not watcher.cancelled() and watcher.result():
                asyncio.current_task().uncancel()  # our own cancel, for the client: handled here
                self.cancelled += 1
                return None
            if staller is not None and staller.done() and not staller.cancelled() and staller.result():
                asyncio.current_task().uncancel()
                self.stalls += 1
                if self.stalls_to_restart and self.stalls >= self.stalls_to_restart:
                    self.wedged = True  # the watchdog replaces it (or ends the stub, under a supervisor)
                raise FirstOutputTimeout(f"no output within {first_output_timeout_s:g} s (aborted; "
                                         f"{self.stalls} such request(s) in a row)") from None
            raise
        finally:
            watcher.cancel()
            if staller is not None:
                staller.cancel()
        raise EngineDead("the vLLM engine ended the request without a final output")

    def _raise_failed(self, reason: str, num_tokens: int) -> None:
        if not self.alive:
            raise EngineDead(f"the vLLM engine went down during the request (finish_reason {reason!r})")
        raise RequestFailed(f"the vLLM engine ended the request with finish_reason {reason!r} after {num_tokens} "
                            "token(s); see the server log for the cause (for llm_decode: the KV transfer from "
                            "llm_prefill failed)")
