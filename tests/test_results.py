"""results/ keeps every session's measurements for `kvbench diff` and `kvbench report`."""

import json
from datetime import datetime, timezone

from pytest_kvcache import machine, plugin

SUITE = """
    import math

    def test_small(kv_bench, kv_model, request_trace):
        trace = request_trace(model=kv_model, rate=math.inf, num_requests=2, prompt_len=16, output_len=4)
        kv_bench(trace, kv_model)
"""


def test_two_sessions_in_the_same_second_keep_both_results(pytester, monkeypatch):
    """Short sessions run back to back (CI steps, `-k` slices) must not overwrite each other's results file."""
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return moment

    monkeypatch.setattr(plugin, "datetime", Frozen)
    monkeypatch.setattr(machine, "calibrate", lambda device="cpu", repeats=31: 0.002)
    pytester.makepyfile(test_small=SUITE)
    results = pytester.path / "results"
    args = ["-p", "no:cacheprovider", "--benchmark-disable", "--kv-rounds", "1",
            "--kv-baselines", str(pytester.path / "baselines"), "--kv-results", str(results)]
    pytester.runpytest(*args).assert_outcomes(passed=1)
    pytester.runpytest(*args, "--kv-rounds", "2").assert_outcomes(passed=1)
    files = sorted(results.glob("kvcache-*.json"))
    assert len(files) == 2, [f.name for f in files]
    rounds = sorted(json.loads(f.read_text())["outcomes"][0]["entry"]["config"]["rounds"] for f in files)
    assert rounds == [1, 2]
