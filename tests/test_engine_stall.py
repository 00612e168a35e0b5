"""VllmEngine's first-output deadline (what llm_decode uses so a request whose KV cache never comes from
llm_prefill fails instead of hanging), and the wedged-engine rule: that many such failures in a row and the engine
counts as dead (alive False), so its watchdog replaces it. Stand-in AsyncLLMs, no vLLM."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from mmtriton.engine import FirstOutputTimeout, VllmEngine


class NeverLLM:
    """A request that waits forever for its KV (no output)."""

    errored = False

    def __init__(self):
        self.aborted: list[str] = []

    async def generate(self, prompt, params, request_id):
        await asyncio.sleep(3600)
        yield None

    async def abort(self, request_id):
        self.aborted.append(request_id)


class OneTokenLLM(NeverLLM):
    async def generate(self, prompt, params, request_id):
        yield SimpleNamespace(outputs=[SimpleNamespace(text="a", token_ids=[7], finish_reason="length")],
                              finished=True, prompt_token_ids=[1, 2], kv_transfer_params=None)


def engine(llm, stalls_to_restart: int = 3) -> VllmEngine:
    e = VllmEngine({"model": "stand-in"})
    e.llm, e._thread, e.stalls_to_restart = llm, threading.current_thread(), stalls_to_restart
    return e


def generate(e: VllmEngine, rid: str, timeout_s: float = 0.1):
    return asyncio.run(e.generate(rid, "p", None, False, lambda _c: None, lambda: False,
                                  first_output_timeout_s=timeout_s))


def test_no_first_output_in_time_aborts_and_raises():
    e = engine(NeverLLM())
    with pytest.raises(FirstOutputTimeout, match=r"no output within 0.1 s"):
        generate(e, "r1")
    assert e.llm.aborted == ["r1"] and e.stalls == 1 and e.alive


def test_stalls_in_a_row_make_the_engine_dead_and_a_success_resets_them():
    e = engine(NeverLLM(), stalls_to_restart=3)
    for i in range(2):
        with pytest.raises(FirstOutputTimeout):
            generate(e, f"r{i}")
    assert e.stalls == 2 and e.alive
    e.llm = OneTokenLLM()
    assert generate(e, "ok").token_ids == [7]
    assert e.stalls == 0  # a first output resets the count
    e.llm = NeverLLM()
    for i in range(3):
        with pytest.raises(FirstOutputTimeout):
            generate(e, f"s{i}")
    assert e.wedged and not e.alive  # the watchdog's cue: replaced like a dead engine


def test_without_a_deadline_nothing_changes():
    e = engine(OneTokenLLM())
    assert asyncio.run(e.generate("x", "p", None, False, lambda _c: None, lambda: False)).token_ids == [7]
    assert e.stalls == 0
