"""The fuzz targets of bench/fuzz.py, 150 derandomized inputs each, 400 for video (the same inputs on every run),
plus one reproducer per known bug.

Property: every parser and decoder returns or raises InvalidInput (the OpenAI door: OpenAIError 400/413), within
fuzz.SLOW_S per input, and never crashes. Each target runs in a child process (fuzz.run_in_child), so a decoder
segfault fails its test instead of killing pytest. Bugs found and not yet fixed are listed in KNOWN_BUGS: their
fuzz findings are tolerated (matched by exception type and the function it escaped from), and their reproducer
test is a strict xfail, so it turns into a failure, asking for its entry to be removed, once the bug is fixed.

~25 s in all on 2 cores (most of it child start-up and imports).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import fuzz  # noqa: E402

EXAMPLES = 150
# Targets that get more: the video decoder's inputs are cheap (~2 ms each) and its formats many.
EXAMPLES_BY_TARGET = {"video": 400}


@dataclass(frozen=True)
class KnownBug:
    id: str
    targets: tuple[str, ...]  # fuzz targets whose findings it explains
    exception: str  # type name of what escapes
    file: str  # innermost project frame it escapes from (fuzz.bug_signature)
    function: str
    reason: str
    example: Callable[[], Any]  # the minimal input, for the first of ``targets``

    def matches(self, signature: str) -> bool:
        return signature.startswith(f"{self.exception} at {self.file}:") and signature.endswith(f" in {self.function}")


def _messages(raw: str) -> dict[str, Any]:
    return {"messages": fuzz.one_string(raw)}


def _sampling(raw: str) -> dict[str, Any]:
    return {"text_input": fuzz.one_string("describe"), "sampling_parameters": fuzz.one_string(raw)}


DEEP = "[" * 100_000
DIGITS = "1" * 5000  # past Python's 4300-digit int() limit: json.loads raises a plain ValueError
JSON_TARGETS = ("messages", "request_tensors")
KNOWN_BUGS: list[KnownBug] = []

# Bugs the fuzzing found and that are fixed: each input must now be refused as the client's error.
FIXED = [
    ("messages", lambda: _messages(DEEP)),
    ("messages", lambda: _messages('[{"role": "user", "content": "x", "n": ' + DIGITS + "}]")),
    ("messages", lambda: _messages('[{"role": "user", "content": [{"type": []}]}]')),
    ("sampling_parameters", lambda: _sampling(DEEP)),
    ("sampling_parameters", lambda: _sampling('{"seed": ' + DIGITS + "}")),
    ("openai_request", lambda: DEEP.encode()),
    ("openai_request", lambda: b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": '
     + DIGITS.encode() + b"}"),
    ("openai_request", lambda: b'{"model": "m", "messages": [{"role": "user", "content": [{"type": {}}]}]}'),
    ("file_url", lambda: "file://[/x"),
    ("file_url", lambda: "file://{dir}/%00"),
    ("file_url", lambda: "file://{dir}/" + "a" * 300),
    ("url_policy", lambda: ("http://[::1", "1.2.3.4", False, False)),
    ("url_policy", lambda: ("http://xn--/", "1.2.3.4", False, False)),
    ("url_policy", lambda: ("http://[::1]:x@/", "1.2.3.4", False, False)),
    ("file_url", lambda: "file://{dir}/\udd2c"),
]


def _unknown_bugs(report: fuzz.TargetReport) -> list[str]:
    known = [b for b in KNOWN_BUGS if report.name in b.targets]
    return [f"{bug.signature} x{bug.count}: {bug.message}\n  shortest input: {bug.example}"
            for bug in report.bugs.values() if not any(k.matches(bug.signature) for k in known)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(fuzz.TARGETS))
def test_fuzz_target(name: str) -> None:
    examples = EXAMPLES_BY_TARGET.get(name, EXAMPLES)
    report = fuzz.run_in_child(name, examples, None, derandomize=True, echo=False)
    if report.skipped:
        pytest.skip(report.skipped)
    assert report.crashed is None, f"{name} crashed: {report.crashed}"
    unknown = _unknown_bugs(report)
    assert not unknown, f"{name}: {len(unknown)} new bug(s):\n" + "\n".join(unknown)
    # Not vacuous: the inputs reached both the accepting and the refusing paths, all of them ran.
    assert report.examples >= examples * 2 // 3, report
    assert report.ok > 0 and report.invalid > 0, f"{name}: ok={report.ok} invalid={report.invalid}"


@pytest.mark.parametrize("target, example", FIXED, ids=[f"{t}-{i}" for i, (t, _) in enumerate(FIXED)])
def test_fixed_bug_stays_fixed(target: str, example: Callable[[], Any]) -> None:
    outcome = fuzz.run_one(fuzz.TARGETS[target], example())
    assert outcome.kind == "invalid", f"{target}: {outcome.kind} {fuzz.bug_signature(outcome)}: {outcome.error!r}"


@pytest.mark.parametrize("bug", [pytest.param(b, marks=pytest.mark.xfail(strict=True, reason=b.reason), id=b.id)
                                 for b in KNOWN_BUGS])
def test_known_bug_reproducer(bug: KnownBug) -> None:
    target = fuzz.TARGETS[bug.targets[0]]
    outcome = fuzz.run_one(target, bug.example())
    assert outcome.kind != "bug", f"{fuzz.bug_signature(outcome)}: {outcome.error!r}"


# A valid 8-channel (7.1) clip in a container libsndfile cannot read (Matroska), so decode_audio's PyAV path decodes
# it. PyAV 18.1 gives a planar ("fltp") 8-channel frame 9 planes (reads past AV_NUM_DATA_POINTERS), and
# AudioFrame.to_ndarray() then segfaults: the whole process (a Triton Python-backend stub) dies.
EIGHT_CHANNEL_DECODE = """
import io, sys
import av, numpy as np
from mmtriton.media.audio import decode_audio
from mmtriton.protocol import InvalidInput
out = io.BytesIO()
with av.open(out, "w", format="matroska") as container:
    stream = container.add_stream("pcm_f32le", rate=16000)
    stream.layout = "7.1"
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 8 * 1600), np.float32), format="flt", layout="7.1")
    frame.sample_rate = 16000
    for packet in [*stream.encode(frame), *stream.encode(None)]:
        container.mux(packet)
try:
    print(decode_audio(out.getvalue(), "audio_url[0]", 16000, 600.0).shape)
except InvalidInput as exc:
    print("InvalidInput", exc)
"""


def test_eight_channel_audio_does_not_crash() -> None:
    """decode_audio used to segfault on 8-channel audio decoded by PyAV (planar to_ndarray)."""
    result = subprocess.run([sys.executable, "-c", EIGHT_CHANNEL_DECODE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"

