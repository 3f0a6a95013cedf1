"""Comparison rules: which metric changes are regressions, improvements or noise."""

import pytest

from pytest_kvcache.baselines import (
    IMPROVED,
    MISSING,
    NEW,
    REGRESSED,
    UNCHANGED,
    Measurement,
    Verdict,
    compare,
    compare_metric,
    overall,
    rule_for,
)
from pytest_kvcache.errors import KVConfigError

BASE = [10.0, 10.2, 10.4, 10.6, 10.8]


def scaled(values, factor):
    return [v * factor for v in values]


def test_time_metric_clearly_slower_regresses():
    """Separated samples 50% slower exceed the 25% TTFT threshold: a regression with its evidence."""
    v = compare_metric("ttft_ms", BASE, scaled(BASE, 1.5))
    assert v.status == REGRESSED and v.fails
    assert v.baseline == pytest.approx(10.4)
    assert v.current == pytest.approx(15.6)
    assert v.change == pytest.approx(0.5)
    assert v.threshold == 0.25
    assert "separated" in v.detail


def test_time_change_within_threshold_is_unchanged():
    """A significant but small change (10% < 25%) is not worth failing CI over."""
    v = compare_metric("ttft_ms", BASE, [x + 1.0 for x in BASE])
    assert v.status == UNCHANGED and not v.fails
    assert v.change == pytest.approx(1.0 / 10.4)


def test_large_but_not_significant_change_is_unchanged():
    """A big median shift from overlapping samples is noise, not evidence."""
    v = compare_metric("e2e_ms", [10.0, 10.0, 30.0], [15.0, 15.0, 15.0])
    assert v.change == pytest.approx(0.5)
    assert v.status == UNCHANGED


def test_time_metric_faster_is_improved():
    """Being told a test got much faster keeps baselines from going stale."""
    v = compare_metric("tpot_ms", BASE, scaled(BASE, 0.5))
    assert v.status == IMPROVED and not v.fails


def test_rate_metric_direction():
    """Throughput is higher-is-better: half the tok/s regresses, double improves."""
    base = [100.0, 101.0, 102.0]
    assert compare_metric("output_throughput", base, [50.0, 51.0, 52.0]).status == REGRESSED
    assert compare_metric("output_throughput", base, [200.0, 201.0, 202.0]).status == IMPROVED
    assert compare_metric("output_throughput", base, [110.0, 111.0, 112.0]).status == UNCHANGED


def test_per_test_threshold_overrides_the_default():
    """kv_thresholds(ttft_ms=0.6) lets a noisy test tolerate +50%."""
    assert compare_metric("ttft_ms", BASE, scaled(BASE, 1.5), threshold=0.6).status == UNCHANGED
    assert compare_metric("ttft_ms", BASE, scaled(BASE, 1.2), threshold=0.1).status == REGRESSED


def test_calibration_makes_a_uniformly_slower_machine_unchanged():
    """A machine 2x slower on the calibration workload and on every timing is not a regression."""
    base = Measurement("t", "s", {}, {"ttft_ms": BASE, "output_throughput": [100.0, 101.0, 102.0]}, 0.010)
    slow = Measurement("t", "s", {}, {"ttft_ms": scaled(BASE, 2.0), "output_throughput": [50.0, 50.5, 51.0]}, 0.020)
    verdicts = {v.metric: v for v in compare(base, slow)}
    assert verdicts["ttft_ms"].status == UNCHANGED
    assert verdicts["ttft_ms"].change == pytest.approx(0.0)
    assert "calibration x0.500" in verdicts["ttft_ms"].detail
    assert verdicts["output_throughput"].status == UNCHANGED
    same_speed = Measurement("t", "s", {}, slow.metrics, 0.010)
    assert {v.status for v in compare(base, same_speed)} == {REGRESSED}


def test_exact_counters_must_match_exactly():
    """Evicted tokens, stored tokens and KV bytes are deterministic: any difference is a change in behaviour."""
    assert compare_metric("kv_tokens_evicted", [90, 90], [90, 90]).status == UNCHANGED
    v = compare_metric("kv_tokens_evicted", [90, 90], [91, 91])
    assert v.status == REGRESSED
    assert "exact counter changed" in v.detail
    assert compare_metric("kv_tokens_evicted", [90, 90], [89, 89]).status == REGRESSED
    assert compare_metric("output_tokens", [48, 48], [48, 47]).status == REGRESSED
    assert compare_metric("kv_bytes_to_host", [0, 0], [0, 0], scale=3.0).status == UNCHANGED


def test_memory_within_tolerance_or_slack_is_unchanged():
    """Memory compares the worst round against a relative tolerance; RSS also gets an absolute slack."""
    mib = 2**20
    assert compare_metric("kv_peak_bytes", [1000, 900], [1050, 1000]).status == UNCHANGED
    v = compare_metric("kv_peak_bytes", [1000, 900], [1200, 1000])
    assert (v.status, v.baseline, v.current) == (REGRESSED, 1000, 1200)
    assert compare_metric("kv_peak_bytes", [1000], [800]).status == IMPROVED
    assert compare_metric("rss_growth_bytes", [1 * mib], [10 * mib]).status == UNCHANGED
    assert compare_metric("rss_growth_bytes", [10 * mib], [40 * mib]).status == REGRESSED
    assert compare_metric("kv_allocated_bytes", [4096], [4097]).status == REGRESSED


def test_memory_is_not_scaled_by_calibration():
    """Bytes do not depend on machine speed."""
    assert compare_metric("kv_peak_bytes", [1000], [1000], scale=0.5).status == UNCHANGED


def test_quality_uses_an_absolute_tolerance():
    """Token agreement may drop 0.02 at most; perplexity ratio may rise 0.02 at most."""
    assert compare_metric("token_agreement", [0.95], [0.94]).status == UNCHANGED
    v = compare_metric("token_agreement", [0.95], [0.90])
    assert v.status == REGRESSED and "absolute change -0.05" in v.detail
    assert compare_metric("token_agreement", [0.90], [0.95]).status == IMPROVED
    assert compare_metric("perplexity_ratio", [1.00], [1.05]).status == REGRESSED
    assert compare_metric("perplexity_ratio", [1.05], [1.00]).status == IMPROVED
    assert compare_metric("passkey_accuracy", [1.0], [0.9]).status == REGRESSED


def test_preemption_count_tolerance():
    """Preemptions appearing where there were none is a change in scheduling."""
    assert compare_metric("preemptions", [0, 0], [2, 2]).status == REGRESSED
    assert compare_metric("preemptions", [4], [5]).status == UNCHANGED


def test_compare_reports_new_and_missing_metrics():
    """No baseline: every metric new. A metric no longer measured is missing; a new one is new."""
    current = Measurement("t", "s", {}, {"ttft_ms": BASE, "kv_tokens_evicted": [3]}, 0.01)
    assert {v.status for v in compare(None, current)} == {NEW}
    assert overall(compare(None, current)) == NEW
    baseline = Measurement("t", "s", {}, {"ttft_ms": BASE, "output_tokens": [8]}, 0.01)
    verdicts = {v.metric: v.status for v in compare(baseline, current)}
    assert verdicts == {"ttft_ms": UNCHANGED, "output_tokens": MISSING, "kv_tokens_evicted": NEW}


def test_overall_verdict_priority():
    """regressed beats improved beats new beats missing beats unchanged."""
    def v(status):
        return Verdict("ttft_ms", status, None, None, None, 0.0)

    assert overall([v(UNCHANGED), v(IMPROVED), v(REGRESSED)]) == REGRESSED
    assert overall([v(UNCHANGED), v(IMPROVED), v(NEW)]) == IMPROVED
    assert overall([v(MISSING), v(NEW)]) == NEW
    assert overall([v(UNCHANGED), v(MISSING)]) == MISSING
    assert overall([v(UNCHANGED)]) == UNCHANGED


def test_regression_description_reads_like_an_assertion():
    """The failure line names metric, baseline, current, change, threshold, evidence and verdict."""
    text = compare_metric("ttft_ms", BASE, scaled(BASE, 1.5)).describe()
    assert text.startswith("ttft_ms: baseline 10.4 ms, current 15.6 ms, change +50.0% (threshold 25%; separated")
    assert text.endswith("-> regressed")


def test_unknown_metric_is_a_config_error():
    """A typo in kv_thresholds(ttft=...) must be reported, not silently ignored."""
    with pytest.raises(KVConfigError, match="unknown metric 'ttft'"):
        rule_for("ttft")


def test_baseline_with_a_metric_this_version_does_not_know(tmp_path):
    """A baseline written by a newer version (extra metric) must give a one-line KVConfigError naming the metric,
    not a bare ValueError from sorting by rule order."""
    baseline = Measurement("t", "s", {}, {"ttft_ms": BASE, "kv_future_metric": [3]}, 0.01)
    current = Measurement("t", "s", {}, {"ttft_ms": BASE}, 0.01)
    with pytest.raises(KVConfigError, match="kv_future_metric"):
        compare(baseline, current)
