"""What VllmEngine's watchdog does when the engine dies, by policy (Settings.engine_on_death), without vLLM:
the watchdog only looks at ``llm.errored`` and, under "exit", ends the process."""

from __future__ import annotations

import asyncio
import time

import pytest
from fakes.engines import DeadLLM, NewLLM, restart_dead_engine

from mmtriton import engine as engine_module
from mmtriton.engine import ENGINE_DEATH_EXIT_CODE, VllmEngine


class ExitCalled(BaseException):  # what os._exit is replaced by: stops the watchdog where the process would end
    pass


def test_exit_policy_ends_the_process_after_the_grace_and_is_not_alive_meanwhile(monkeypatch):
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise ExitCalled

    monkeypatch.setattr(engine_module.os, "_exit", fake_exit)
    monkeypatch.setattr(engine_module, "EXIT_GRACE_S", 0.05)
    import vllm.v1.engine.async_llm  # noqa: F401 - the watchdog imports it first: seconds, not in the timing below

    engine = VllmEngine({"model": "m"}, on_death="exit")
    engine.llm, engine.watch_interval_s = DeadLLM(), 0.01

    async def run() -> None:
        engine._stop = asyncio.Event()
        watchdog = asyncio.ensure_future(engine._watch())
        await asyncio.sleep(0.03)  # death seen, in the grace: requests get EngineDead, nothing restarts
        assert engine.restarting and not engine.alive and not codes
        # The requests in flight got vLLM's EngineDeadError at once (not after vLLM's shutdown of up to 5 s,
        # which would come after this process ended).
        assert [type(e).__name__ for e in engine.llm.output_processor.propagated] == ["EngineDeadError"]
        with pytest.raises(ExitCalled):
            await watchdog

    asyncio.run(run())
    assert codes == [ENGINE_DEATH_EXIT_CODE]
    assert engine.restarts == 0


def test_exit_waits_for_the_before_exit_drains_and_ends_even_when_one_never_finishes(monkeypatch):
    events: list[str] = []

    def fake_exit(code: int) -> None:
        events.append(f"exit {code}")
        raise ExitCalled

    monkeypatch.setattr(engine_module.os, "_exit", fake_exit)
    monkeypatch.setattr(engine_module, "EXIT_GRACE_S", 0.01)
    monkeypatch.setattr(engine_module, "EXIT_DRAIN_S", 0.2)
    import vllm.v1.engine.async_llm  # noqa: F401

    def slow_drain(timeout_s: float) -> bool:
        time.sleep(0.1)  # the responses of the requests in flight still leaving
        events.append(f"drained within {timeout_s}")
        return True

    def stuck_drain(timeout_s: float) -> bool:
        time.sleep(timeout_s)
        events.append("gave up")
        return False

    engine = VllmEngine({"model": "m"}, on_death="exit")
    engine.llm, engine.watch_interval_s = DeadLLM(), 0.01
    engine.before_exit += [slow_drain, stuck_drain]

    async def run() -> None:
        engine._stop = asyncio.Event()
        with pytest.raises(ExitCalled):
            await engine._watch()

    asyncio.run(run())
    assert events == ["drained within 0.2", "gave up", f"exit {ENGINE_DEATH_EXIT_CODE}"]


def test_restart_policy_never_ends_the_process(monkeypatch):
    monkeypatch.setattr(engine_module.os, "_exit", lambda code: pytest.fail(f"os._exit({code}) under 'restart'"))
    engine = VllmEngine({"model": "m"}, on_death="restart")
    built = restart_dead_engine(monkeypatch, engine)
    assert len(built) == 1
    assert engine.restarts == 1 and isinstance(engine.llm, NewLLM) and not engine.restarting


def test_unknown_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="engine_on_death 'reboot'"):
        VllmEngine({"model": "m"}, on_death="reboot")
