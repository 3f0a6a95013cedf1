"""Serving metrics on hand-made records: the formulas follow vLLM's benchmark tool exactly."""

import math

import numpy as np
import pytest

from pytest_kvcache.metrics import SLO, KVCounters, RequestRecord, RunResult, percentiles, serving_metrics


def record(rid, arrival, times, success=True):
    return RequestRecord(rid, arrival, prompt_tokens=10, output_ids=list(range(len(times))), token_times_s=list(times),
                         success=success)


def test_per_request_latencies():
    """TTFT, E2E, TPOT and ITL of one request, computed by hand."""
    r = record("a", 1.0, [1.5, 1.6, 1.8, 2.1])
    assert r.ttft_s == pytest.approx(0.5)
    assert r.e2e_s == pytest.approx(1.1)
    assert r.tpot_s == pytest.approx((1.1 - 0.5) / 3)
    assert r.itl_s == pytest.approx([0.1, 0.2, 0.3])
    assert r.output_tokens == 4


def test_single_token_request_has_no_tpot():
    """TPOT divides by (tokens - 1): a one-token request has none, not a division by zero."""
    r = record("a", 0.0, [0.25])
    assert r.tpot_s is None
    assert r.itl_s == []
    assert r.e2e_s == r.ttft_s == 0.25


def test_serving_metrics_formulas():
    """Samples in ms per request, throughputs over the makespan, failed requests left out but counted."""
    records = [
        record("a", 0.0, [0.1, 0.2, 0.3]),          # ttft 100, e2e 300, tpot 100
        record("b", 0.5, [0.9, 1.0, 1.1, 1.2, 1.3]),  # ttft 400, e2e 800, tpot 100
        record("c", 1.0, [1.05]),                   # ttft 50, e2e 50, no tpot
        record("d", 1.0, [], success=False),
    ]
    m = serving_metrics(RunResult(records, duration_s=2.0, counters=KVCounters()))
    assert m.ttft_ms == pytest.approx([100, 400, 50])
    assert m.e2e_ms == pytest.approx([300, 800, 50])
    assert m.tpot_ms == pytest.approx([100, 100])
    assert m.itl_ms == pytest.approx([100, 100, 100, 100, 100, 100])
    assert (m.completed, m.failed, m.output_tokens) == (3, 1, 9)
    assert m.request_throughput == pytest.approx(3 / 2.0)
    assert m.output_throughput == pytest.approx(9 / 2.0)
    assert m.goodput == pytest.approx(3 / 2.0)


def test_goodput_counts_only_requests_meeting_both_slos():
    """Goodput is requests meeting TTFT and TPOT SLOs per second; a miss on either does not count."""
    records = [
        record("fast", 0.0, [0.1, 0.15, 0.2]),   # ttft 100, tpot 50
        record("slow-first", 0.0, [0.6, 0.65]),  # ttft 600 > 500
        record("slow-decode", 0.0, [0.1, 0.4]),  # tpot 300 > 200
        record("one-token", 0.0, [0.2]),         # ttft 200, no tpot: meets
    ]
    m = serving_metrics(RunResult(records, 4.0, KVCounters()), SLO(ttft_ms=500, tpot_ms=200))
    assert m.goodput == pytest.approx(2 / 4.0)
    assert m.request_throughput == pytest.approx(4 / 4.0)


def test_zero_duration_gives_zero_rates():
    """An empty run must not divide by zero."""
    m = serving_metrics(RunResult([], 0.0, KVCounters()))
    assert (m.request_throughput, m.output_throughput, m.goodput, m.completed) == (0.0, 0.0, 0.0, 0)


def test_percentiles_match_a_hand_computation():
    """mean, median, p90, p99 with linear interpolation (numpy's default, as vLLM reports)."""
    values = [float(v) for v in range(1, 11)]
    p = percentiles(values)
    assert p["mean"] == pytest.approx(5.5)
    assert p["median"] == pytest.approx(5.5)
    # rank = q/100 * (n-1): p90 -> 8.1 -> 9 + 0.1*(10-9); p99 -> 8.91 -> 9.91
    assert p["p90"] == pytest.approx(9.1)
    assert p["p99"] == pytest.approx(9.91)
    assert p["p90"] == pytest.approx(float(np.percentile(values, 90)))


def test_percentiles_of_nothing_are_nan():
    """No samples gives NaN, not an exception that ends the run."""
    assert all(math.isnan(v) for v in percentiles([]).values())


def test_kv_counters_resident_and_peak():
    """Resident bytes go up and down; the peak remembers the highest point exactly."""
    c = KVCounters()
    for delta in (100, 50, -120, 60, -90):
        c.add_resident(delta)
    assert c.resident_bytes == 0
    assert c.peak_resident_bytes == 150
    c.add_resident(151)
    assert c.peak_resident_bytes == 151
