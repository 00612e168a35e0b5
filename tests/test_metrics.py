"""Stage timing bookkeeping (mmtriton.metrics)."""

from __future__ import annotations

import time

from mmtriton.metrics import StageTimes


def test_stage_times_count_and_sum():
    times = StageTimes()
    with times.time("encode"):
        time.sleep(0.01)
    times.add("decode_tokens", 0.5, count=24)
    assert times.counts() == {"encode": 1.0, "decode_tokens": 24.0}
    assert 0.009 < times.sums()["encode"] < 1.0 and times.sums()["decode_tokens"] == 0.5


def test_failed_stage_is_still_timed():
    times = StageTimes()
    try:
        with times.time("image_load"):
            raise ValueError("bad image")
    except ValueError:
        pass
    assert times.counts() == {"image_load": 1.0}
