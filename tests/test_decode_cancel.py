"""DecodeService's cancel by request id (what multimodal_bls sends llm_decode when its client goes: Triton 2.51's
BLS cannot cancel a request it made), with a stand-in engine that streams until told to stop. No server, no vLLM."""

from __future__ import annotations

import asyncio

from mmtriton import disagg
from mmtriton.disagg import DecodeService
from mmtriton.families import TEXT_ONLY
from mmtriton.settings import Settings
from mmtriton.wire import DecodeCancel, DecodeRequest, PrefillResult, sign

KEY = b"k" * 32


class StreamingEngine:
    """Emits a token every 10 ms until ``cancelled()``; returns None then, as VllmEngine does."""

    def __init__(self):
        self.emitted = 0

    async def generate(self, request_id, prompt, params, stream, emit, cancelled, first_output_timeout_s=None):
        for _ in range(1000):
            if cancelled():
                return None
            self.emitted += 1
            await asyncio.sleep(0.01)
        return "finished"


def service() -> DecodeService:
    svc = DecodeService.__new__(DecodeService)  # no engine start: the stand-in below
    svc.family, svc.key, svc.engine, svc._cancels = TEXT_ONLY, KEY, StreamingEngine(), {}
    svc.settings = Settings()
    return svc


def request(request_id: str) -> DecodeRequest:
    prefill = sign(PrefillResult(kv_transfer_params={"x": 1}, num_input_tokens=3), KEY)
    return DecodeRequest(prompt="hi", prefill=prefill, request_id=request_id)


def test_a_decode_cancel_stops_that_request_only():
    svc = service()

    async def run():
        mine = asyncio.ensure_future(svc.run(request("a"), lambda _c: None, lambda: False))
        other = asyncio.ensure_future(svc.run(request("b"), lambda _c: None, lambda: False))
        await asyncio.sleep(0.1)
        svc.cancel(DecodeCancel(request_id="a"))
        assert await asyncio.wait_for(mine, 1) is None  # stopped within a step
        assert not other.done()
        svc.cancel(DecodeCancel(request_id="b"))
        assert await asyncio.wait_for(other, 1) is None

    asyncio.run(run())
    assert svc._cancels == {}  # each run forgets its id when it ends


def test_a_cancel_that_comes_first_stops_the_decode_at_once():
    svc = service()
    svc.cancel(DecodeCancel(request_id="early"))
    assert asyncio.run(svc.run(request("early"), lambda _c: None, lambda: False)) is None
    assert svc.engine.emitted == 0


def test_old_cancels_are_forgotten(monkeypatch):
    svc = service()
    now = [1000.0]
    monkeypatch.setattr(disagg.time, "monotonic", lambda: now[0])
    svc.cancel(DecodeCancel(request_id="gone"))
    now[0] += disagg.CANCEL_MEMORY_S + 1
    svc.cancel(DecodeCancel(request_id="new"))
    assert set(svc._cancels) == {"new"}


def test_without_a_request_id_only_the_client_cancels():
    svc = service()
    svc.cancel(DecodeCancel(request_id="x"))
    flag = {"cancelled": False}

    async def run():
        task = asyncio.ensure_future(svc.run(request(""), lambda _c: None, lambda: flag["cancelled"]))
        await asyncio.sleep(0.05)
        assert not task.done()
        flag["cancelled"] = True
        return await asyncio.wait_for(task, 1)

    assert asyncio.run(run()) is None


def test_an_ensemble_decode_is_cancelled_by_its_triton_request_id():
    # The ensemble's llm_decode step carries the client's request id (the payload has none); a cancel by that id
    # while it runs stops it, and a cancel left over from an earlier request with the same id does not.
    svc = service()
    svc.cancel(DecodeCancel(request_id="client-7"))  # a stale cancel: client ids may repeat

    async def run():
        task = asyncio.ensure_future(svc.run(request(""), lambda _c: None, lambda: False, "client-7"))
        await asyncio.sleep(0.05)
        assert not task.done(), "a cancel from before the decode started stopped it"
        svc.cancel(DecodeCancel(request_id="client-7"))
        return await asyncio.wait_for(task, 1)

    assert asyncio.run(run()) is None
    assert svc._cancels == {}


def test_the_payload_id_wins_over_the_triton_request_id():
    svc = service()

    async def run():
        task = asyncio.ensure_future(svc.run(request("bls-1"), lambda _c: None, lambda: False, "client-7"))
        await asyncio.sleep(0.05)
        svc.cancel(DecodeCancel(request_id="client-7"))
        await asyncio.sleep(0.05)
        assert not task.done()
        svc.cancel(DecodeCancel(request_id="bls-1"))
        return await asyncio.wait_for(task, 1)

    assert asyncio.run(run()) is None
