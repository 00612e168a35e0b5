"""Streaming streams on every front door: a 64-token answer's first token arrives well before its last one.

When tritonserver ran in a scheduler autogroup of its own (mmtriton.process_session), a client in another one woke
up hundreds of ms late while the engine ran and read whole answers in one burst at the end; the token stream
equality tests could not see it. Timed with the same clients as bench/stream_timing.py: gRPC (sync and asyncio),
HTTP ``generate_stream`` and our OpenAI server's SSE. The bound is an order of magnitude on this machine (first
token ≈ 5% of the answer's time when it streams, 100% when it bursts), so it does not flake on a slow run.
"""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import stream_timing  # noqa: E402 - the benchmark's clients: the test times exactly what it reports

pytestmark = pytest.mark.integration

TOKENS = 64
FRONT_DOORS = ["grpc-sync", "grpc-aio", "http-sse", "openai-sse"]


@pytest.fixture(scope="module")
def clients(triton_server, openai_server):
    c = openai_server.config
    return stream_timing.client_kinds(triton_server.config.grpc_url, triton_server.config.http_url,
                                      f"{c.host}:{c.port}")


@pytest.mark.parametrize("model", stream_timing.PATHS)
@pytest.mark.parametrize("front_door", FRONT_DOORS)
def test_the_first_token_arrives_well_before_the_last(clients, model, front_door):
    arrivals = clients[front_door]
    arrivals(model, 4)  # a warm connection and path, as a client streaming its second answer has
    times = arrivals(model, TOKENS)
    assert len(times) >= TOKENS // 2, f"{len(times)} token responses for {TOKENS} tokens"  # vLLM may merge two
    first, last = times[0], times[-1]
    assert first <= last / 2, (f"{model} via {front_door}: first token at {first * 1e3:.0f} ms, last at "
                               f"{last * 1e3:.0f} ms: the answer came in a burst")
