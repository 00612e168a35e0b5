"""Stand-ins for vLLM's AsyncLLM, for tests of VllmEngine's watchdog without vLLM."""

from __future__ import annotations

import asyncio
from typing import Any


class ErrorsToRequests:
    """AsyncLLM.output_processor, as far as the watchdog uses it: the errors handed to the requests in flight."""

    def __init__(self) -> None:
        self.propagated: list[BaseException] = []

    def propagate_error(self, e: BaseException) -> None:
        self.propagated.append(e)


class DeadLLM:
    """An AsyncLLM whose engine has died (all the watchdog looks at)."""

    errored = True

    def __init__(self) -> None:
        self.output_processor = ErrorsToRequests()

    def shutdown(self) -> None:
        pass


class NewLLM:
    """The AsyncLLM the watchdog builds in place of a dead one."""

    errored = False


def restart_dead_engine(monkeypatch, engine, watch_s: float = 0.1) -> list[tuple[dict[str, Any], Any]]:
    """Give ``engine`` a dead AsyncLLM and run its watchdog for ``watch_s``, with vLLM's AsyncLLM faked. Returns
    (engine args, stat_loggers) of every engine the watchdog built meanwhile."""
    import vllm.v1.engine.async_llm as async_llm

    built: list[tuple[dict[str, Any], Any]] = []

    class FakeAsyncLLM:
        @staticmethod
        def from_engine_args(args, stat_loggers=None):
            built.append((args, stat_loggers))
            return NewLLM()

    monkeypatch.setattr(async_llm, "AsyncLLM", FakeAsyncLLM)
    engine.llm, engine.watch_interval_s = DeadLLM(), 0.01

    async def run() -> None:
        engine._stop = asyncio.Event()
        watchdog = asyncio.ensure_future(engine._watch())
        await asyncio.sleep(watch_s)
        watchdog.cancel()

    asyncio.run(run())
    return built
