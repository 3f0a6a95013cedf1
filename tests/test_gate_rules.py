"""The one gate's rules: which metric changes are regressions, improvements, noise or not comparable."""

import math

import pytest

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.gate import gate, judge_effect, pair_log_ratio, paired
from pytest_kvcache.metrics import metric
from pytest_kvcache.results import (
    IMPROVED,
    MISSING,
    NEW,
    NOT_COMPARABLE,
    REGRESSED,
    UNCHANGED,
    UNKNOWN,
    Measurement,
    Verdict,
    overall,
)
from pytest_kvcache.stats import Effect

MACHINE = {"cpu": "test cpu", "cores": 2, "torch": "2.13"}
BASE = [10.0, 10.1, 10.2]


def m(metrics, calibration=0.01, config=None, machine=MACHINE):
    return Measurement("t", "s", config or {"strategy": "full"}, metrics, calibration, dict(machine))


def one(metric_name, base, current, session_sd=0.0, **kwargs):
    """The verdict of one metric between two sessions (a dedicated runner by default: no session noise)."""
    verdicts = gate(m({metric_name: base}), m({metric_name: current}), session_sd=session_sd, **kwargs)
    return verdicts[0]


def scaled(values, factor):
    return [v * factor for v in values]


def test_time_metric_clearly_slower_regresses_with_its_evidence():
    """50% slower with tight rounds, on a dedicated runner: above the 3% threshold and significant."""
    v = one("ttft_ms", BASE, scaled(BASE, 1.5))
    assert v.status == REGRESSED and v.fails
    assert (v.baseline, v.current) == (pytest.approx(10.1), pytest.approx(15.15))
    assert v.change == pytest.approx(0.5)
    assert v.threshold == metric("ttft_ms").threshold == 0.03
    assert v.low > 1.0 and "one session per side (3/3 rounds)" in v.detail


def test_between_session_noise_hides_what_one_session_cannot_show():
    """With the shared machine's session noise (15%), +50% is not evidence but 3x still is."""
    assert one("ttft_ms", BASE, scaled(BASE, 1.5), session_sd=0.15).status == UNKNOWN
    assert one("ttft_ms", BASE, scaled(BASE, 3.0), session_sd=0.15).status == REGRESSED


def test_change_within_the_threshold_is_unchanged():
    """A 0.5% change whose whole interval lies within +-3% is unchanged, not merely unknown."""
    assert one("tpot_ms", BASE, scaled(BASE, 1.005)).status == UNCHANGED


def test_faster_is_improved():
    """Being told a test got much faster keeps baselines from going stale."""
    assert one("tpot_ms", BASE, scaled(BASE, 0.5)).status == IMPROVED


def test_rate_metric_direction():
    """Throughput is higher-is-better: half the tok/s regresses, double improves."""
    base = [100.0, 101.0, 102.0]
    assert one("output_throughput", base, scaled(base, 0.5)).status == REGRESSED
    assert one("output_throughput", base, scaled(base, 2.0)).status == IMPROVED
    assert one("output_throughput", base, scaled(base, 1.005)).status == UNCHANGED


def test_per_test_threshold_overrides_the_default():
    """kv_thresholds(ttft_ms=0.6) tolerates +50%; a tighter one catches +20%."""
    assert one("ttft_ms", BASE, scaled(BASE, 1.5), thresholds={"ttft_ms": 0.6}).status == UNCHANGED
    assert one("ttft_ms", BASE, scaled(BASE, 1.2), thresholds={"ttft_ms": 0.1}).status == REGRESSED


def test_calibration_makes_a_uniformly_slower_machine_unchanged():
    """A machine 2x slower on the calibration workload and on every timing is not a regression."""
    base = m({"ttft_ms": BASE, "output_throughput": [100.0, 101.0, 102.0]}, 0.010)
    slow = m({"ttft_ms": scaled(BASE, 2.0), "output_throughput": [50.0, 50.5, 51.0]}, 0.020)
    verdicts = {v.metric: v for v in gate(base, slow, session_sd=0.0)}
    assert verdicts["ttft_ms"].status == UNCHANGED
    assert verdicts["ttft_ms"].change == pytest.approx(0.0)
    assert "calibration x0.500" in verdicts["ttft_ms"].detail
    assert verdicts["output_throughput"].status == UNCHANGED
    same_speed = m(slow.metrics, 0.010)
    assert {v.status for v in gate(base, same_speed, session_sd=0.0)} == {REGRESSED}


@pytest.mark.parametrize("calibration", [1e-5, 0.1], ids=["baseline-claims-1000x-faster-machine", "10x-slower"])
def test_calibration_out_of_range_makes_time_metrics_not_comparable(calibration):
    """A calibration ratio outside [0.5, 2] neither passes nor fails time metrics; exact counters still count."""
    base = m({"ttft_ms": BASE, "kv_tokens_evicted": [5, 5, 5]}, calibration)
    current = m({"ttft_ms": scaled(BASE, 3.0), "kv_tokens_evicted": [6, 6, 6]}, 0.01)
    verdicts = {v.metric: v for v in gate(base, current)}
    assert verdicts["ttft_ms"].status == NOT_COMPARABLE
    assert "calibration ratio" in verdicts["ttft_ms"].detail and "outside [0.5, 2]" in verdicts["ttft_ms"].detail
    assert verdicts["kv_tokens_evicted"].status == REGRESSED


def test_latency_tails_need_a_nearly_equal_calibration():
    """At a calibration ratio of x1.67 (inside [0.5, 2]) the median is scaled and compared but a p90 is not
    comparable (the busy-machine false failure: ITL p90 x2.49 on unchanged code); at x1.1 both are compared."""
    metrics = {"itl_ms": BASE, "itl_p90_ms": BASE}
    current = {"itl_ms": scaled(BASE, 1 / 1.67), "itl_p90_ms": scaled(BASE, 1.5)}
    verdicts = {v.metric: v for v in gate(m(metrics, 0.0167), m(current, 0.01), session_sd=0.0)}
    assert verdicts["itl_ms"].status == UNCHANGED
    tail = verdicts["itl_p90_ms"]
    assert tail.status == NOT_COMPARABLE and "x1.67 outside [0.8, 1.25], the range for latency tails" in tail.detail
    near = {v.metric: v for v in gate(m(metrics, 0.011), m(current, 0.01), session_sd=0.0)}
    assert near["itl_p90_ms"].status == REGRESSED and near["itl_ms"].status == IMPROVED


def test_another_machine_makes_time_metrics_not_comparable():
    """Timings from another CPU are not compared; bytes and counters are."""
    base = m({"ttft_ms": BASE, "kv_peak_bytes": [1000]}, machine={**MACHINE, "cpu": "Other CPU"})
    current = m({"ttft_ms": scaled(BASE, 3.0), "kv_peak_bytes": [1000]})
    verdicts = {v.metric: v for v in gate(base, current)}
    assert verdicts["ttft_ms"].status == NOT_COMPARABLE
    assert verdicts["ttft_ms"].detail == "baseline from another machine (cpu: baseline 'Other CPU', here 'test cpu')"
    assert verdicts["kv_peak_bytes"].status == UNCHANGED


def test_disturbed_rounds_make_time_metrics_not_comparable():
    """Rounds that other processes kept waiting for the CPU say nothing about the code; counters still count."""
    base = m({"ttft_ms": BASE, "kv_tokens_evicted": [5]})
    current = m({"ttft_ms": scaled(BASE, 3.0), "kv_tokens_evicted": [6]})
    current.info["still_disturbed"] = 2
    verdicts = {v.metric: v for v in gate(base, current)}
    assert verdicts["ttft_ms"].status == NOT_COMPARABLE
    assert verdicts["ttft_ms"].detail == "other processes took this CPU during rounds (2 now): timings disturbed"
    assert verdicts["kv_tokens_evicted"].status == REGRESSED


def test_another_configuration_is_never_compared():
    """Another trace, rounds or worker count: every metric not comparable, with the keys that differ."""
    base = m({"ttft_ms": BASE, "kv_tokens_evicted": [5]}, config={"rounds": 3, "trace": {"seed": 1}})
    current = m({"ttft_ms": BASE, "kv_tokens_evicted": [9]}, config={"rounds": 5, "trace": {"seed": 2}})
    verdicts = gate(base, current)
    assert {v.status for v in verdicts} == {NOT_COMPARABLE}
    assert verdicts[0].detail == "configuration differs (rounds: 3 -> 5; trace.seed: 1 -> 2)"
    assert not any(v.fails for v in verdicts)


def test_exact_counters_must_match_exactly():
    """Evicted tokens, stored tokens and KV bytes are deterministic: any difference is a change in behaviour."""
    assert one("kv_tokens_evicted", [90, 90], [90, 90]).status == UNCHANGED
    v = one("kv_tokens_evicted", [90, 90], [91, 91])
    assert v.status == REGRESSED and v.detail == "exact counter changed: 90 -> 91"
    assert one("kv_tokens_evicted", [90, 90], [89, 89]).status == REGRESSED
    assert one("output_tokens", [48, 48], [48, 47]).status == REGRESSED


def test_memory_within_tolerance_or_slack_is_unchanged():
    """Memory compares the worst round against a relative tolerance; RSS also gets an absolute slack."""
    mib = 2**20
    assert one("kv_peak_bytes", [1000, 900], [1050, 1000]).status == UNCHANGED
    v = one("kv_peak_bytes", [1000, 900], [1200, 1000])
    assert (v.status, v.baseline, v.current) == (REGRESSED, 1000, 1200)
    assert one("kv_peak_bytes", [1000], [800]).status == IMPROVED
    assert one("rss_growth_bytes", [1 * mib], [10 * mib]).status == UNCHANGED
    assert one("rss_growth_bytes", [10 * mib], [40 * mib]).status == REGRESSED
    assert one("kv_allocated_bytes", [4096], [4097]).status == REGRESSED


def test_memory_is_not_scaled_by_calibration():
    """Bytes do not depend on machine speed."""
    assert gate(m({"kv_peak_bytes": [1000]}, 0.02), m({"kv_peak_bytes": [1000]}, 0.01))[0].status == UNCHANGED


def test_scores_use_an_absolute_tolerance():
    """Token agreement may drop 0.02 at most; perplexity ratio may rise 0.02 at most; KL is lower-is-better."""
    assert one("top1_agreement", [0.95], [0.94]).status == UNCHANGED
    v = one("top1_agreement", [0.95], [0.90])
    assert v.status == REGRESSED and "absolute change -0.05" in v.detail
    assert one("top1_agreement", [0.90], [0.95]).status == IMPROVED
    assert one("perplexity_ratio", [1.00], [1.05]).status == REGRESSED
    assert one("kl_divergence", [0.10], [0.12]).status == REGRESSED
    assert one("passkey_accuracy", [1.0], [0.9]).status == REGRESSED
    assert one("passkey_accuracy", [2 / 3], [0.666667]).status == UNCHANGED


def test_preemption_count_tolerance():
    """Preemptions appearing where there were none is a change in scheduling."""
    assert one("preemptions", [0, 0], [2, 2]).status == REGRESSED
    assert one("preemptions", [4], [5]).status == UNCHANGED


def test_new_and_missing_metrics():
    """No baseline: every metric new. A metric no longer measured is missing; a new one is new."""
    current = m({"ttft_ms": BASE, "kv_tokens_evicted": [3]})
    assert {v.status for v in gate(None, current)} == {NEW}
    baseline = m({"ttft_ms": BASE, "output_tokens": [8]})
    verdicts = {v.metric: v.status for v in gate(baseline, current, session_sd=0.0)}
    assert verdicts == {"ttft_ms": UNCHANGED, "output_tokens": MISSING, "kv_tokens_evicted": NEW}


def test_overall_verdict_priority():
    """regressed beats improved beats new, missing and not comparable; unknown counts as unchanged."""
    def v(status):
        return Verdict("ttft_ms", status, None, None, None, 0.0)

    assert overall([v(UNCHANGED), v(IMPROVED), v(REGRESSED)]) == REGRESSED
    assert overall([v(UNCHANGED), v(IMPROVED), v(NEW)]) == IMPROVED
    assert overall([v(MISSING), v(NEW)]) == NEW
    assert overall([v(UNCHANGED), v(NOT_COMPARABLE)]) == NOT_COMPARABLE
    assert overall([v(UNCHANGED), v(UNKNOWN)]) == UNCHANGED


def test_regression_description_reads_like_an_assertion():
    """The failure line names metric, baseline, current, change, threshold, evidence and verdict."""
    text = one("ttft_ms", BASE, scaled(BASE, 1.5)).describe()
    assert text.startswith("ttft_ms: baseline 10.1 ms, current 15.15 ms, change +50.0% (threshold 3%; x1.500, ")
    assert text.endswith("-> regressed")


def test_judge_effect_needs_both_significance_and_size():
    """Significant but below the threshold is unknown; above it but not significant is unknown too."""
    ttft = metric("ttft_ms")
    assert judge_effect(ttft, Effect(1.02, 1.01, 1.05, 0.99, 12, ""), 0.03) == UNKNOWN
    assert judge_effect(ttft, Effect(1.10, 0.95, 1.3, 0.99, 12, ""), 0.03) == UNKNOWN
    assert judge_effect(ttft, Effect(1.10, 1.05, 1.15, 0.99, 12, ""), 0.03) == REGRESSED
    assert judge_effect(ttft, Effect(1.00, 0.99, 1.01, 0.99, 12, ""), 0.03) == UNCHANGED
    rate = metric("output_throughput")
    assert judge_effect(rate, Effect(0.90, 0.85, 0.95, 0.99, 12, ""), 0.03) == REGRESSED
    assert judge_effect(rate, Effect(1.00, 0.0, float("inf"), 0.99, 3, ""), 0.03) == UNKNOWN


def test_unknown_metric_is_a_config_error():
    """A typo in kv_thresholds(ttft=...) must be reported, not silently ignored."""
    with pytest.raises(KVConfigError, match="unknown metric 'ttft'"):
        metric("ttft")


def sessions(values, name="tpot_ms", config=None, extra=None):
    return [Measurement("t", "s", config or {"rounds": 1}, {name: [v], **(extra or {})}, 0.01, MACHINE) for v in values]


def test_paired_sessions_same_slower_and_changed():
    """compare's verdicts come from the same rules: tight equal pairs are same, +20% is slower, a counter that
    moved is a regression with both values."""
    base = [10.0, 10.2, 9.9, 10.1, 10.0, 10.3, 9.8, 10.1, 10.0, 10.2]
    same = paired(sessions(base), sessions([b * 1.001 for b in base]))[0]
    assert same.status == UNCHANGED
    slower = paired(sessions(base), sessions([b * 1.2 for b in base]))[0]
    assert slower.status == REGRESSED and slower.change == pytest.approx(0.2)
    counters = paired(sessions(base, extra={"kv_tokens_evicted": [7]}), sessions(base, extra={"kv_tokens_evicted": [8]}))
    evicted = next(v for v in counters if v.metric == "kv_tokens_evicted")
    assert (evicted.status, evicted.detail) == (REGRESSED, "exact counter changed: 7 -> 8")


def test_paired_sessions_of_another_configuration_are_not_comparable():
    verdicts = paired(sessions([1.0] * 8, config={"rounds": 1}), sessions([1.0] * 8, config={"rounds": 2}))
    assert {v.status for v in verdicts} == {NOT_COMPARABLE}
    assert verdicts[0].detail == "configuration differs (rounds: 1 -> 2)"


def test_a_pair_of_interleaved_sessions_is_judged_round_by_round():
    """Same rounds on both sides: the mean of round-by-round log ratios (round i ran next to round i); otherwise
    the ratio of the sessions' medians."""
    assert pair_log_ratio([1.0, 2.0, 4.0], [2.0, 4.0, 8.0]) == pytest.approx(math.log(2.0))
    assert pair_log_ratio([10.0, 40.0, 10.0], [20.0, 40.0, 20.0]) == pytest.approx(2 * math.log(2.0) / 3)
    assert pair_log_ratio([1.0, 3.0], [2.0]) == pytest.approx(0.0)


def calibrated(values, offsets, slowdown=1.0):
    """One session per pair: 3 rounds of `values[i]` in a process `offsets[i]` times slower, calibration included
    (4 points around the 3 rounds); `slowdown` is what the head's code adds to the samples only."""
    return [Measurement("t", "s", {"rounds": 3}, {"tpot_ms": [v * k * slowdown] * 3, "output_throughput": [100 / (k * slowdown)] * 3},
                        0.002 * k, MACHINE, {"calibration_points_s": [0.002 * k] * 4})
            for v, k in zip(values, offsets)]


def test_paired_times_are_adjusted_for_each_process_calibration():
    """A process's speed offset shows in its own calibration (benchmarks/results/gate-calibrated.md): processes of
    both sides that ran up to 60% slow in the engine and the calibration alike are judged the same (the ratios less
    their slope on the calibration's), a planted 10% in the samples alone is still found; a head whose calibration
    itself moved is judged on raw times, with the reason."""
    base = [10.0] * 12
    slow = [1.0, 1.6, 1.2, 1.5, 1.3, 1.4, 1.2, 1.6, 1.3, 1.5, 1.2, 1.4]
    raw = paired(sessions(base), sessions([b * k / j for b, k, j in zip(base, slow[6:] + slow[:6], slow)]))[0]
    assert raw.status == UNKNOWN
    same = {v.metric: v for v in paired(calibrated(base, slow), calibrated(base, slow[6:] + slow[:6]))}
    assert same["tpot_ms"].status == same["output_throughput"].status == UNCHANGED
    assert same["tpot_ms"].detail.endswith("adjusted for the calibration (slope 1.00)")
    assert same["output_throughput"].detail.endswith("adjusted for the calibration (slope -1.00)")
    wobble = [1.0, 1.02, 0.99, 1.01] * 3
    slower = paired(calibrated(base, wobble), calibrated(base, wobble[::-1], slowdown=1.1))
    assert {v.status for v in slower} == {REGRESSED}
    assert slower[0].change == pytest.approx(0.1)
    whole = paired(calibrated(base, [1.0] * 12), calibrated(base, [1.2] * 12))
    assert {v.status for v in whole} == {REGRESSED}
    assert whole[0].detail.endswith("raw times: the head's calibration is x1.200 the base's")
    bare = paired(sessions(base), sessions(base))[0]
    assert bare.detail.endswith("raw times (no calibration around every round)")


def test_history_dependent_device_readings_are_reported_and_the_allocator_growth_is_gated():
    """Absolute device peaks include models earlier tests left loaded: 3.4 GiB more against a stored baseline is
    unknown (with the reason), never a failure; the allocator's growth above the test's start is still gated."""
    gib = 2**30
    base = {"allocator_peak_bytes": [35 * gib], "peak_device_bytes": [40 * gib], "allocator_peak_growth_bytes": [gib]}
    now = {"allocator_peak_bytes": [38.4 * gib], "peak_device_bytes": [43.4 * gib], "allocator_peak_growth_bytes": [gib]}
    verdicts = {v.metric: v for v in gate(m(base), m(now))}
    for name in ("allocator_peak_bytes", "peak_device_bytes"):
        assert verdicts[name].status == UNKNOWN and "depends on what ran before" in verdicts[name].detail
    assert verdicts["allocator_peak_growth_bytes"].status == UNCHANGED and overall(list(verdicts.values())) == UNCHANGED
    grown = {**now, "allocator_peak_growth_bytes": [1.2 * gib]}
    assert {v.metric: v for v in gate(m(base), m(grown))}["allocator_peak_growth_bytes"].status == REGRESSED
    assert all(metric(n).history_dependent
               for n in ("peak_device_growth_bytes", "reserved_peak_growth_bytes", "outside_allocator_growth_bytes"))
