"""An engine that dies (its process killed) is replaced: the model answers UNAVAILABLE meanwhile, then serves
the same tokens again. For the disaggregated path that also means the KV connector's peers are re-established
(a restarted prefill engine gets a new engine id, so decode hand-shakes anew). Runs against the session server."""

from __future__ import annotations

import base64
import time

import psutil
import pytest

from client import InferenceFailed, RequestInputs, build_inputs, stream_grpc
from conftest import metric, pattern_image, png_bytes

pytestmark = pytest.mark.integration


def engine_core_of(server, model: str) -> psutil.Process:
    root = psutil.Process(server.process.pid)
    for proc in root.children(recursive=True):
        if f"{model}/1/model.py" in " ".join(proc.cmdline()):
            cores = [c for c in proc.children(recursive=True) if "EngineCore" in c.name() + " ".join(c.cmdline())]
            assert cores, f"no EngineCore under {model}'s stub"
            return cores[0]
    raise AssertionError(f"no stub process for {model}")


def answer(server, model: str, inputs: RequestInputs) -> list[int]:
    t0 = time.monotonic()
    try:
        return [t for r in stream_grpc(server.config.grpc_url, model, inputs, timeout_s=120) for t in r["token_ids"]]
    finally:
        # Nothing waits for the client's timeout: an answer or an error comes within seconds, outage or not.
        assert time.monotonic() - t0 < 60, f"{model}: a request took {time.monotonic() - t0:.0f} s"


class InFlight:
    """Long streamed requests running while the engine is killed: each must end (an error, or a whole answer)
    within a bounded time after the kill, never hang and never end as an empty success."""

    def __init__(self, server, model: str, inputs: RequestInputs, count: int = 3):
        import threading

        self.outcomes: list[tuple[str, float]] = []
        self.started = threading.Barrier(count + 1)
        self.threads = [threading.Thread(target=self._one, args=(server, model, inputs), daemon=True)
                        for _ in range(count)]
        for t in self.threads:
            t.start()
        self.started.wait(timeout=60)
        time.sleep(1.0)  # well into their answers

    def _one(self, server, model: str, inputs: RequestInputs) -> None:
        self.started.wait(timeout=60)
        try:
            got = [t for r in stream_grpc(server.config.grpc_url, model, inputs, timeout_s=120) for t in r["token_ids"]]
            self.outcomes.append(("answer" if got else "EMPTY", time.monotonic()))
        except InferenceFailed as exc:
            self.outcomes.append((f"error: {exc}", time.monotonic()))
        except TimeoutError:
            self.outcomes.append(("HUNG", time.monotonic()))

    def check(self, killed_at: float, bound_s: float = 30.0) -> list[str]:
        for t in self.threads:
            t.join(150)
        assert len(self.outcomes) == len(self.threads)
        for outcome, at in self.outcomes:
            assert outcome == "answer" or outcome.startswith("error: "), outcome
            assert at - killed_at < bound_s, f"{outcome[:80]!r} came {at - killed_at:.0f} s after the kill"
        return [outcome for outcome, _ in self.outcomes]


def kill_and_recover(server, engine_model: str, model: str, inputs: RequestInputs,
                     in_flight: RequestInputs | None = None) -> tuple[list[int], list[str]]:
    """Kill ``engine_model``'s EngineCore by its exact PID (with ``in_flight`` requests streaming through ``model``
    at that moment), then ask ``model`` until the engine has restarted and an answer comes. Returns that answer
    and the errors seen meanwhile. Every reply meanwhile is an answer with tokens or an error, never an empty
    success."""
    restarts = metric(server, "mmtriton_engine", "restarts", engine_model)
    running = InFlight(server, model, in_flight) if in_flight is not None else None
    engine_core_of(server, engine_model).kill()
    errors: list[str] = []
    if running is not None:  # what the requests in flight got counts as the outage too
        errors += [o.removeprefix("error: ") for o in running.check(killed_at=time.monotonic()) if o != "answer"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            got = answer(server, model, inputs)
            assert got, f"{model}: an answer with no tokens and no error"
            if metric(server, "mmtriton_engine", "restarts", engine_model) > restarts:
                recovered_at = time.monotonic()
                return got, errors + [f"recovered after {300 - (deadline - recovered_at):.0f} s"]
        except InferenceFailed as exc:
            errors.append(str(exc))
        time.sleep(0.5)
    raise AssertionError(f"{engine_model} did not come back within 300 s; errors: {errors[-3:]}")


def test_killed_engine_is_restarted_and_serves_the_same_tokens(triton_server):
    inputs = build_inputs("Hello there", sampling={"max_tokens": 8, "temperature": 0})
    before = answer(triton_server, "multimodal_agg", inputs)
    long_answers = RequestInputs(text_input="Tell me a long story.", sampling_parameters={
        "max_tokens": 3000, "min_tokens": 3000, "temperature": 0}, stream=True)
    after, errors = kill_and_recover(triton_server, "multimodal_agg", "multimodal_agg", inputs, in_flight=long_answers)
    assert metric(triton_server, "mmtriton_engine", "alive", "multimodal_agg") == 1
    assert after == before
    outage = errors[:-1]
    # The requests in flight at the kill fail, clearly (later ones may instead wait for the new engine).
    assert outage, "no request saw the outage"
    assert all("unavailable" in e.lower() and "engine" in e.lower() for e in outage), outage[:3]


@pytest.mark.parametrize("engine_model", ["llm_prefill", "llm_decode"])
def test_killed_prefill_or_decode_engine_heals_the_disaggregated_path(triton_server, engine_model):
    """After either engine of the pair restarts, prefill → decode over the KV connector works again and gives the
    tokens it gave before (a prompt of several whole KV blocks, so KV really moves), on both pipelines."""
    image = "data:image/png;base64," + base64.b64encode(png_bytes(pattern_image(100, 80, seed=1))).decode()
    text = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 30)
    inputs = RequestInputs(text_input=text, image_url=[image], sampling_parameters={"max_tokens": 8,
                                                                                   "temperature": 0}, stream=True)
    before = answer(triton_server, "multimodal_bls", inputs)
    after, errors = kill_and_recover(triton_server, engine_model, "multimodal_bls", inputs)
    assert after == before, errors[-3:]
    assert answer(triton_server, "multimodal", inputs) == before
    assert metric(triton_server, "mmtriton_engine", "alive", engine_model) == 1
    # Requests meanwhile either failed as unavailable or waited for the new engine (the watchdog restarts it on
    # the engine's own loop, so queued requests run on the new one) — never an empty answer (kill_and_recover).
    outage = errors[:-1]
    assert all("unavailable" in e.lower() or "engine" in e.lower() for e in outage), outage[:3]
