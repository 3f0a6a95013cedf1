"""The capacity search: doubling then log-space bisection, the answer and every probe, and its edge cases."""

import json
import math

import pytest

from pytest_kvcache.capacity import Probe, meets, search
from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.metrics import SLO


def threshold(limit: float, asked: list[float]):
    """A system that meets the SLO up to `limit` req/s."""
    def probe(rate: float) -> Probe:
        asked.append(rate)
        return Probe(rate, 10.0, 1.0, rate <= limit)

    return probe


def test_doubles_then_bisects_in_log_space():
    asked: list[float] = []
    found = search(threshold(50.0, asked), low=4.0, high=512.0, bisections=2)
    assert asked[:5] == [4.0, 8.0, 16.0, 32.0, 64.0]
    assert asked[5] == pytest.approx(math.sqrt(32 * 64))  # 45.25: passes
    assert asked[6] == pytest.approx(math.sqrt(math.sqrt(32 * 64) * 64))  # 53.8: fails
    assert found.rate == pytest.approx(math.sqrt(32 * 64)) and not found.censored
    assert [p.rate for p in found.probes] == asked
    assert all(p.meets_slo for p in found.probes if p.rate <= found.rate)


def test_lowest_rate_failing_is_zero_and_highest_passing_is_censored():
    asked: list[float] = []
    assert search(threshold(1.0, asked), low=4.0, high=64.0).rate == 0.0 and asked == [4.0]
    asked.clear()
    found = search(threshold(1e9, asked), low=4.0, high=48.0)
    assert (found.rate, found.censored, asked) == (48.0, True, [4.0, 8.0, 16.0, 32.0, 48.0])


@pytest.mark.parametrize("low, high, bisections", [(0.0, 8.0, 1), (8.0, 8.0, 1), (1.0, math.inf, 1), (1.0, 8.0, -1)])
def test_bad_search_ranges_are_refused(low, high, bisections):
    with pytest.raises(KVConfigError, match="capacity search"):
        search(threshold(1.0, []), low, high, bisections)


def test_meets_needs_both_targets():
    slo = SLO(ttft_ms=100.0, tpot_ms=10.0)
    assert meets(slo, 100.0, 10.0) and not meets(slo, 100.1, 1.0) and not meets(slo, 1.0, 10.1)


CAPACITY_SUITE = """
    import pytest
    from pytest_kvcache.metrics import SLO

    @pytest.mark.parametrize("ttft_ms", [1e6, 1e-3], ids=["loose", "impossible"])
    def test_cap(kv_bench, kv_model, request_trace, ttft_ms):
        def trace_at(rate):
            return request_trace(model=kv_model, rate=rate, num_requests=4, prompt_len=16, output_len=4, seed=1)

        kv_bench.capacity(trace_at, kv_model, "streaming:budget=0.5", low=64.0, high=128.0, bisections=1,
                          slo=SLO(ttft_ms=ttft_ms, tpot_ms=1e6))
"""


def test_kv_bench_capacity_records_the_search(pytester):
    """kv_bench.capacity on the tiny model: capacity_rps and every probe in the results file, the search's plan in
    the configuration; a loose SLO is met up to the highest rate (a lower bound), an impossible one at no rate."""
    pytester.makepyfile(test_capsuite=CAPACITY_SUITE)
    results = pytester.path / "r"
    pytester.runpytest("-p", "no:cacheprovider", "--kv-cpu", "off", "--kv-baselines", "b", "--kv-results",
                       str(results)).assert_outcomes(passed=2)
    outcomes = {o["test_id"]: o["entry"] for o in json.loads((results / "latest.json").read_text())["outcomes"]}
    loose, impossible = outcomes["test_cap[tiny-loose]"], outcomes["test_cap[tiny-impossible]"]
    assert loose["metrics"]["capacity_rps"]["samples"] == [128.0] and loose["info"]["capacity_censored"] is True
    assert [p["rate"] for p in loose["info"]["capacity_probes"]] == [64.0, 128.0]
    assert impossible["metrics"]["capacity_rps"]["samples"] == [0.0]
    assert [p["meets_slo"] for p in impossible["info"]["capacity_probes"]] == [False]
    assert loose["config"]["study"] == "capacity" and loose["config"]["search"]["high"] == 128.0
    assert loose["calibration_s"] > 0
