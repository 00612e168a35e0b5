"""The first token from prefill, without a server: when prefill hands its sampled token over
(disagg.first_token_of), what llm_decode sends and asks vLLM for (DecodeService with a stand-in engine), and the KV
connector loading the prompt's KV only (kv_connector.QuietNixlConnector). The tokens themselves are checked
against agg and a plain vLLM run by the live tests of every pipeline (test_disagg_server and others)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from mmtriton.disagg import DecodeService, TextContext, first_token_head, first_token_of
from mmtriton.engine import GenerationChunk
from mmtriton.families import TEXT_ONLY
from mmtriton.metrics import StageTimes
from mmtriton.protocol import SamplingOptions
from mmtriton.settings import Settings
from mmtriton.wire import TOKENS_AFTER_PREFILL, DecodeRequest, FirstToken, PrefillResult, sign

KEY = b"k" * 32


def prefill_final(finish_reason: str = "length", token_ids: tuple[int, ...] = (42,)) -> GenerationChunk:
    return GenerationChunk(text=" hi", token_ids=list(token_ids), finish_reason=finish_reason, num_input_tokens=7,
                           num_output_tokens=len(token_ids), finished=True)


def test_prefill_hands_over_its_token_when_the_answer_goes_on_past_it():
    assert first_token_of(prefill_final(), SamplingOptions(max_tokens=8), text_context()) == FirstToken(
        token_id=42, text="<42>", prompt_token_ids=PROMPT_IDS)
    # A byte of a character (text "" for now) too: decode's detokenizer joins it to the rest.
    part = GenerationChunk(text="", token_ids=[115], finish_reason="length", num_input_tokens=7, num_output_tokens=1,
                           finished=True)
    assert first_token_of(part, SamplingOptions(max_tokens=8), text_context()) == FirstToken(
        token_id=115, text="", prompt_token_ids=PROMPT_IDS)


@pytest.mark.parametrize(("final", "sampling", "why"), [
    (prefill_final("stop"), SamplingOptions(max_tokens=8), "the first token ended the answer (EOS)"),
    (prefill_final(), SamplingOptions(max_tokens=1), "the client asked for one token only"),
    (prefill_final(), SamplingOptions(max_tokens=8, stop=["END"]), "stop strings are matched in decode's text"),
    (prefill_final(token_ids=()), SamplingOptions(max_tokens=8), "no token at all"),
])
def test_otherwise_decode_computes_the_first_token_itself(final, sampling, why):
    assert first_token_of(final, sampling, text_context()) is None, why


PROMPT_IDS = [ord("a"), ord("b")]  # the prompt of decode_request(), as Tokenizer tokenizes it


def text_context() -> TextContext:
    return TextContext(list(PROMPT_IDS), Detokenizer(Tokenizer(), list(PROMPT_IDS), None))


def first_token(token_id: int) -> FirstToken:
    """What prefill hands over for decode_request()'s prompt: the token, its text (Detokenizer's), the prompt."""
    return FirstToken(token_id=token_id, text="" if token_id % 2 else f"<{token_id}>", prompt_token_ids=PROMPT_IDS)


class Tokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class Detokenizer:
    """vLLM's incremental detokenizer as FirstTokenAhead uses it: token t reads "<t>", but an odd token is the
    first byte of a character whose text comes with the next token (as byte tokens do)."""

    def __init__(self, tokenizer, prompt_ids: list[int], params) -> None:
        self.prompt_ids, self.params = prompt_ids, params
        self.text, self.sent, self.pending = "", 0, ""
        self.stop_terminated: list[bool] = []

    def update(self, new_token_ids: list[int], stop_terminated: bool) -> None:
        self.stop_terminated.append(stop_terminated)
        for t in new_token_ids:
            if t % 2:
                self.pending += f"<{t}"
            else:
                self.text += self.pending + (">" if self.pending else "") + f"<{t}>"
                self.pending = ""

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


class CountingTokenizer(Tokenizer):
    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode(self, text: str) -> list[int]:
        self.encoded.append(text)
        return super().encode(text)


def test_prefill_works_out_the_first_tokens_text_and_the_prompts_ids_for_decode():
    """What decode would do before it could send the first token, prefill does while its engine computes: the
    token's text as a detokenizer primed with the text prompt's ids prints it, and those ids."""
    context = TextContext([ord("a"), ord("b")], Detokenizer(Tokenizer(), [ord("a"), ord("b")], None))
    assert first_token_of(prefill_final(token_ids=(6,)), SamplingOptions(max_tokens=8), context) == FirstToken(
        token_id=6, text="<6>", prompt_token_ids=[97, 98])
    # A first byte of a character: no text yet (it comes with the next token, from decode's detokenizer).
    context = TextContext([97], Detokenizer(Tokenizer(), [97], None))
    assert first_token_of(prefill_final(token_ids=(9,)), SamplingOptions(max_tokens=8), context).text == ""


class RecordingEngine:
    """VllmEngine.generate as the decode service uses it: records what it was asked, emits ``steps``."""

    def __init__(self, steps: list[list[int]]):
        self.steps = steps
        self.llm = SimpleNamespace(tokenizer=Tokenizer())
        self.times = StageTimes()
        self.asked: dict = {}

    async def generate(self, request_id, prompt, params, stream, emit, cancelled, first_output_timeout_s=None):
        self.asked = {"prompt": prompt, "params": params}
        done: list[int] = []
        chunk = None
        for i, ids in enumerate(self.steps):
            done += ids
            last = i == len(self.steps) - 1
            chunk = GenerationChunk(text="".join(f"<{t}>" for t in ids), token_ids=list(ids),
                                    finish_reason="length" if last else "", num_input_tokens=len(prompt.get(
                                        "prompt_token_ids", [])), num_output_tokens=len(done), finished=last)
            if stream:
                emit(chunk)
        if not stream:
            chunk.text, chunk.token_ids = "".join(f"<{t}>" for t in done), done
            emit(chunk)
        return chunk


def service(engine: RecordingEngine) -> DecodeService:
    svc = DecodeService.__new__(DecodeService)  # no vLLM engine: the stand-in
    svc.family, svc.key, svc.engine, svc._cancels = TEXT_ONLY, KEY, engine, {}
    svc.settings = Settings()
    svc.detokenizer = Detokenizer
    return svc


def decode_request(first: FirstToken | None, stream: bool, max_tokens: int = 4, min_tokens: int = 2) -> DecodeRequest:
    prefill = sign(PrefillResult(kv_transfer_params={"do_remote_prefill": True, "remote_block_ids": [[1]]},
                                 num_input_tokens=2, first_token=first), KEY)
    return DecodeRequest(prompt="ab", prefill=prefill, stream=stream,
                         sampling=SamplingOptions(max_tokens=max_tokens, min_tokens=min_tokens, temperature=0))


def test_a_streamed_decode_sends_prefills_token_first_and_counts_it():
    engine = RecordingEngine([[8], [9], [10]])
    sent: list[GenerationChunk] = []
    final = asyncio.run(service(engine).run(decode_request(first_token(6), stream=True),
                                            sent.append, lambda: False))
    assert [c.token_ids for c in sent] == [[6], [8], [9], [10]]
    # The text is our detokenizer's, from the prompt on: 9 is a character's first byte, its text comes with 10.
    assert [c.text for c in sent] == ["<6>", "<8>", "", "<9><10>"]
    assert [c.num_output_tokens for c in sent] == [1, 2, 3, 4]
    assert all(c.num_input_tokens == 2 for c in sent)  # the client's prompt; the first token is not input
    assert [c.finished for c in sent] == [False, False, False, True] and final is sent[-1]
    assert engine.times.counts()["first_token_ahead"] == 1  # what the live tests read from the metrics
    # vLLM decodes from the prompt's tokens plus the first token, one token less to make, KV for the prompt only.
    assert engine.asked["prompt"] == {"prompt_token_ids": [ord("a"), ord("b"), 6]}
    assert engine.asked["params"].max_tokens == 3 and engine.asked["params"].min_tokens == 1
    assert engine.asked["params"].detokenize is False  # vLLM's text would be primed with the first token
    kv = engine.asked["params"].extra_args["kv_transfer_params"]
    assert kv[TOKENS_AFTER_PREFILL] == 1 and kv["remote_block_ids"] == [[1]]


def test_a_decode_that_is_not_streamed_answers_once_with_the_whole_answer():
    engine = RecordingEngine([[8], [9], [10]])
    sent: list[GenerationChunk] = []
    asyncio.run(service(engine).run(decode_request(first_token(7), stream=False), sent.append,
                                    lambda: False))
    assert len(sent) == 1
    # 7 is a first byte: nothing to show for it alone; joined with 8 in the one response.
    assert sent[0].token_ids == [7, 8, 9, 10] and sent[0].text == "<7><8><9><10>"
    assert sent[0].num_output_tokens == 4 and sent[0].finished


def test_without_a_first_token_decode_makes_every_token_from_the_text_prompt():
    engine = RecordingEngine([[6], [7]])
    sent: list[GenerationChunk] = []
    asyncio.run(service(engine).run(decode_request(None, stream=True), sent.append, lambda: False))
    assert [c.token_ids for c in sent] == [[6], [7]]
    assert engine.asked["prompt"] == {"prompt": "ab"}
    assert engine.asked["params"].max_tokens == 4
    assert TOKENS_AFTER_PREFILL not in engine.asked["params"].extra_args["kv_transfer_params"]


def test_a_first_token_that_was_not_signed_by_prefill_is_refused():
    from mmtriton.protocol import InvalidInput

    request = decode_request(first_token(6), stream=True)
    forged = request.model_copy(update={"prefill": request.prefill.model_copy(
        update={"first_token": first_token(5)})})
    with pytest.raises(InvalidInput, match="not signed"):
        asyncio.run(service(RecordingEngine([[7]])).run(forged, lambda _c: None, lambda: False))


# --- the KV connector: KV for the prompt only ----------------------------------------------------------------------


class PullScheduler:
    """NixlPullConnectorScheduler.get_num_new_matched_tokens: every prompt token not computed locally."""

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return len(request.prompt_token_ids) - num_computed_tokens, True


def matched(params: dict, prompt_len: int = 257, computed: int = 0) -> tuple[int, bool]:
    from mmtriton.kv_connector import QuietNixlConnector

    connector = QuietNixlConnector.__new__(QuietNixlConnector)  # the scheduler-side method only
    connector.connector_scheduler = PullScheduler()
    request = SimpleNamespace(prompt_token_ids=list(range(prompt_len)), kv_transfer_params=params)
    return connector.get_num_new_matched_tokens(request, computed)


def test_the_connector_loads_kv_for_the_prompt_and_leaves_the_first_token_to_decode():
    remote = {"do_remote_prefill": True, TOKENS_AFTER_PREFILL: 1}
    # 256 prompt tokens + the first: two blocks of 128 remote, where the whole 257 would need a third.
    assert matched(remote) == (256, True)
    assert matched(remote, computed=128) == (128, True)  # a local prefix hit: the rest only
    assert matched(remote, computed=256) == (0, False)  # all of it here already: nothing to wait for
    assert matched({"do_remote_prefill": True}) == (257, True)  # vLLM's own behaviour otherwise


def test_decode_sends_the_text_prefill_worked_out_first_and_uses_its_prompt_ids():
    engine = RecordingEngine([[8], [9], [10]])
    engine.llm.tokenizer = tokenizer = CountingTokenizer()
    sent: list[GenerationChunk] = []
    order: list[str] = []

    class Watching(Detokenizer):
        def __init__(self, *args):
            order.append("detokenizer")
            super().__init__(*args)

    svc = service(engine)
    svc.detokenizer = Watching
    first = FirstToken(token_id=6, text="<6>", prompt_token_ids=[ord("a"), ord("b")])

    def emit(chunk: GenerationChunk) -> None:
        order.append(f"sent {chunk.token_ids}")
        sent.append(chunk)

    asyncio.run(svc.run(decode_request(first, stream=True), emit, lambda: False))
    assert order[:2] == ["sent [6]", "detokenizer"]  # the head goes before decode builds anything
    assert [c.text for c in sent] == ["<6>", "<8>", "", "<9><10>"]
    assert tokenizer.encoded == []  # prefill's ids: the prompt is not tokenized again
    assert engine.asked["prompt"] == {"prompt_token_ids": [ord("a"), ord("b"), 6]}


def test_decode_does_not_send_the_first_token_again_when_its_caller_sent_it():
    engine = RecordingEngine([[8], [9], [10]])
    sent: list[GenerationChunk] = []
    first = FirstToken(token_id=6, text="<6>", prompt_token_ids=[ord("a"), ord("b")])
    request = decode_request(first, stream=True).model_copy(update={"first_token_sent": True})
    asyncio.run(service(engine).run(request, sent.append, lambda: False))
    assert [c.token_ids for c in sent] == [[8], [9], [10]]
    assert [c.num_output_tokens for c in sent] == [2, 3, 4]  # the first token counts: the client has it
    assert engine.times.counts()["first_token_ahead"] == 1


def test_the_first_token_head_is_for_streamed_requests_with_prefills_text():
    first = FirstToken(token_id=6, text="<6>", prompt_token_ids=[97])
    head = first_token_head(decode_request(first, stream=True))
    assert (head.token_ids, head.text, head.num_output_tokens, head.num_input_tokens, head.finished) == (
        [6], "<6>", 1, 2, False)
    assert first_token_head(decode_request(first, stream=False)) is None
    with pytest.raises(ValidationError):  # prefill always sends the text and the prompt's ids with it
        FirstToken(token_id=6)
    assert first_token_head(decode_request(None, stream=True)) is None
