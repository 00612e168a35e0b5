"""What VllmEngine's watchdog does when the engine dies, by policy (Settings.engine_on_death), without vLLM:
the watchdog only looks at ``llm.errored`` and, under "exit", ends the process."""

from __future__ import annotations

import asyncio

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
        with pytest.raises(ExitCalled):
            await watchdog

    asyncio.run(run())
    assert codes == [ENGINE_DEATH_EXIT_CODE]
    assert engine.restarts == 0


def test_restart_policy_never_ends_the_process(monkeypatch):
    monkeypatch.setattr(engine_module.os, "_exit", lambda code: pytest.fail(f"os._exit({code}) under 'restart'"))
    engine = VllmEngine({"model": "m"}, on_death="restart")
    built = restart_dead_engine(monkeypatch, engine)
    assert len(built) == 1
    assert engine.restarts == 1 and isinstance(engine.llm, NewLLM) and not engine.restarting


def test_unknown_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="engine_on_death 'reboot'"):
        VllmEngine({"model": "m"}, on_death="reboot")
