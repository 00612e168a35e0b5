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


def test_stage_histogram_counts_what_sum_and_count_count():
    times = StageTimes(buckets=(0.01, 0.1, 1.0))
    times.add("decode", 0.5, count=25)  # one request's decode: 25 tokens at 20 ms
    times.add("decode", 2.0)
    times.add("skipped", 0.0, count=0)  # nothing executed: no observation
    histogram = times.histograms()["decode"]
    assert histogram.cumulative() == [(0.01, 0), (0.1, 25), (1.0, 25), (float("inf"), 26)]
    assert (histogram.count, histogram.sum) == (times.counts()["decode"], times.sums()["decode"])
    assert "skipped" not in times.histograms()
