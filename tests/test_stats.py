"""Statistics behind a verdict, checked on simulated timings shaped like the measured ones.

The simulation follows what was measured on the tiny model (issue 9): a request's latency is mostly set by its
place in the trace (intra-class correlation 0.74-1.00 across rounds), rounds inside one process vary by a few
percent, and separate processes differ by an offset of about +-10%.
"""

import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from pytest_kvcache.stats import (
    ALPHA,
    Effect,
    fittable_covariate,
    median,
    min_pairs,
    min_pvalue_sign_flip,
    paired_effects,
    paired_log_effects,
    relative_change,
    remove_covariate,
    session_effect,
)

REQUESTS, ROUNDS = 12, 3
PROCESS_SD = 0.06  # log-scale SD of a process's offset: medians of separate processes within about +-10%
ROUND_SD = 0.04  # rounds inside one process: CV 2-7%
REQUEST_SD = 0.5  # spread of latency over the trace's positions
NOISE_SD = 0.1  # per request and round: ICC = 0.25 / (0.25 + 0.0016 + 0.01) = 0.96


def session(rng, positions, shift=0.0):
    """Per-request latencies (rounds x requests) of one simulated process."""
    offset = rng.normal(0, PROCESS_SD) + shift
    rounds = rng.normal(0, ROUND_SD, size=(ROUNDS, 1))
    return np.exp(positions + offset + rounds + rng.normal(0, NOISE_SD, size=(ROUNDS, REQUESTS)))


def icc(values):
    """Share of the variance explained by the request's position (one-way random effects, on logs)."""
    logs = np.log(values)
    between = logs.mean(axis=0).var(ddof=1)
    within = logs.var(axis=0, ddof=1).mean()
    return (between - within / logs.shape[0]) / (between + within * (1 - 1 / logs.shape[0]))


def test_simulated_trace_has_the_measured_correlation():
    """The model behind the other tests: ICC across rounds inside the measured 0.74-1.00."""
    rng = np.random.default_rng(0)
    positions = rng.normal(0, REQUEST_SD, size=REQUESTS)
    assert 0.74 <= icc(session(rng, positions)) <= 1.0


def test_pooled_request_latencies_give_false_regressions():
    """Why per-request values are never samples: pooled over rounds, two processes of identical code 'differ' at
    p < 0.01 several times more often than 1% of the time, even on this quiet model of the machine (the old gate
    printed Mann-Whitney p=3e-13 on unchanged code under load)."""
    rng = np.random.default_rng(1)
    positions = rng.normal(0, REQUEST_SD, size=REQUESTS)
    trials, false = 300, 0
    for _ in range(trials):
        a, b = session(rng, positions).ravel(), session(rng, positions).ravel()
        false += mannwhitneyu(a, b).pvalue < ALPHA
    assert false / trials > 0.05


def test_session_gate_false_positive_rate_on_unchanged_code():
    """The stored-baseline gate on per-round medians: identical code in separate processes is significant on fewer
    than 1% of 2000 simulated sessions (the assumed session noise covers the process offset)."""
    rng = np.random.default_rng(2)
    positions = rng.normal(0, REQUEST_SD, size=REQUESTS)
    trials, false = 2000, 0
    for _ in range(trials):
        base = np.median(session(rng, positions), axis=1)
        current = np.median(session(rng, positions), axis=1)
        false += session_effect(base, current, session_sd=0.15).significant
    assert false / trials <= 0.01


def test_session_gate_still_sees_a_3x_change():
    """A baseline claiming 3x faster TTFT stays significant across sessions; a 20% one is within the noise."""
    rng = np.random.default_rng(3)
    positions = rng.normal(0, REQUEST_SD, size=REQUESTS)
    base = np.median(session(rng, positions), axis=1)
    current = np.median(session(rng, positions), axis=1)
    effect = session_effect(base / 3, current, session_sd=0.15, alpha=ALPHA / 16)
    assert effect.significant and effect.low > 1.25
    assert not session_effect(base / 1.2, current, session_sd=0.15, alpha=ALPHA / 16).significant


def paired_sessions(rng, pairs, metrics, shift=0.0, heavy=False):
    """Session values (pairs x metrics) of base and head: each session has its own process offset shared by its
    metrics, plus per-metric noise; `heavy` draws offsets from a t distribution with 3 degrees of freedom."""
    def offsets():
        raw = rng.standard_t(3, size=(pairs, 1)) / math.sqrt(3) if heavy else rng.normal(size=(pairs, 1))
        return raw * PROCESS_SD
    base = np.exp(offsets() + rng.normal(0, ROUND_SD, size=(pairs, metrics)))
    head = np.exp(offsets() + shift + rng.normal(0, ROUND_SD, size=(pairs, metrics)))
    return base, head


@pytest.mark.parametrize("heavy", [False, True], ids=["normal-offsets", "heavy-tailed-offsets"])
def test_paired_false_positive_rate_on_unchanged_code(heavy):
    """A/A compares of 12 pairs and 6 correlated metrics: any metric significant in at most ~1% of 1000 compares
    (exact under the random order of each pair, whatever the offsets' distribution)."""
    rng = np.random.default_rng(4)
    trials, false = 1000, 0
    for _ in range(trials):
        base, head = paired_sessions(rng, 12, 6, heavy=heavy)
        false += any(e.significant for e in paired_effects(base, head, seed=int(rng.integers(1 << 30))))
    assert false / trials <= 0.02  # 1% expected; 2% leaves room for the binomial spread of 1000 trials


def test_paired_power_on_a_20_percent_slowdown():
    """The same design finds a 20% slowdown of every metric in at least 95% of 200 compares."""
    rng = np.random.default_rng(5)
    found = 0
    for _ in range(200):
        base, head = paired_sessions(rng, 12, 6, shift=math.log(1.2))
        found += any(e.low > 1.0 for e in paired_effects(base, head))
    assert found >= 190


def test_too_few_pairs_make_no_claim():
    """The smallest p-value n pairs can give is 2 / 2**n: at alpha 0.01 seven pairs are never enough."""
    assert min_pvalue_sign_flip(7) == pytest.approx(2 / 128)
    assert min_pvalue_sign_flip(8) == pytest.approx(2 / 256)
    assert min_pairs(0.01) == 8
    assert min_pairs(0.05) == 6
    slower = [[1.0, 1.0]] * 7, [[1.5, 1.5]] * 7
    effects = paired_effects(*slower)
    assert all(e.low == 0.0 and e.high == math.inf and not e.significant for e in effects)
    assert "8 pairs needed" in effects[0].method
    eight = paired_effects([[1.0 + 0.01 * i] for i in range(8)], [[1.5 + 0.02 * i] for i in range(8)])
    assert eight[0].significant and eight[0].ratio == pytest.approx(1.5, rel=0.02)


def test_paired_interval_is_simultaneous_over_metrics():
    """More metrics widen every interval: the family-wise error of a test stays alpha."""
    rng = np.random.default_rng(6)
    base, head = paired_sessions(rng, 16, 8)
    one = paired_effects(base[:, :1], head[:, :1])[0]
    many = paired_effects(base, head)[0]
    assert one.ratio == pytest.approx(many.ratio)
    assert (many.high - many.low) > (one.high - one.low)
    assert "sign-flip max-t over 8 metrics" in many.method


def test_paired_effects_refuse_bad_shapes_and_values():
    with pytest.raises(ValueError, match="one shape"):
        paired_effects([[1.0]], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="> 0"):
        paired_effects([[0.0]] * 8, [[1.0]] * 8)


def test_identical_sessions_are_exactly_equal():
    """No change at all: ratio 1 with a zero-width interval."""
    effect = paired_effects([[2.0]] * 9, [[2.0]] * 9)[0]
    assert (effect.ratio, effect.low, effect.high, effect.significant) == (1.0, 1.0, 1.0, False)


def test_effect_describes_itself():
    text = Effect(1.1, 1.02, 1.2, 0.99, 12, "paired sessions, n=12").describe()
    assert text == "x1.100, 99.00% CI [1.020, 1.200], paired sessions, n=12"


def test_median_and_relative_change():
    """Representative value and change definitions, including a zero baseline."""
    assert median([3.0, 1.0, 2.0, 10.0]) == 2.5
    assert relative_change(10.0, 15.0) == pytest.approx(0.5)
    assert relative_change(10.0, 5.0) == pytest.approx(-0.5)
    assert relative_change(-10.0, -5.0) == pytest.approx(0.5)
    assert relative_change(0.0, 0.0) == 0.0
    assert relative_change(0.0, 1.0) == math.inf


def test_a_covariate_slope_is_removed_with_an_intercept():
    """Ratios that follow the calibration's ratio at slope 1.5 plus a constant keep the constant: the line is fitted
    with an intercept, so a covariate whose pairs lean one way does not take the change as slope."""
    c = np.array([0.3, -0.2, 0.1, -0.4, 0.2])
    d = np.column_stack([1.5 * c + 0.1, -c])
    adjusted, slopes = remove_covariate(d, c)
    assert slopes == pytest.approx([1.5, -1.0])
    assert adjusted[:, 0] == pytest.approx(np.full(5, 0.1)) and adjusted[:, 1] == pytest.approx(np.zeros(5))
    assert remove_covariate(d, np.zeros(5))[0] == pytest.approx(d)
    with pytest.raises(ValueError, match="one finite covariate per pair"):
        remove_covariate(d, [1.0, 2.0])


def test_with_a_covariate_the_estimate_is_the_intercept_and_a_large_change_stays_found():
    """The case that made a 4x slowdown `unknown` (tests/test_compare.py, fresh-clone CI at 0c30704): every pair
    ~x4 slower, one pair's calibration disturbed (+0.22) and the rest leaning positive. The estimate is the
    least-squares intercept, its interval a multiple of the intercept's standard error, and it excludes 1 (the
    interval is wide: flipping only the disturbed pair fits nearly as well, so the critical t is large)."""
    c = np.array([-0.007, 0.025, 0.007, 0.221, 0.003, 0.011, 0.002, -0.021])
    d = np.array([1.533, 1.899, 1.814, 2.304, 1.526, 1.455, 1.668, 1.697])
    (effect,) = paired_log_effects(d[:, None], covariate=c)
    X = np.column_stack([np.ones(8), c])
    coef, rss, *_ = np.linalg.lstsq(X, d, rcond=None)
    se = math.sqrt(rss[0] / 6 * np.linalg.inv(X.T @ X)[0, 0])
    assert effect.ratio == pytest.approx(math.exp(coef[0]))
    assert math.log(effect.high) - math.log(effect.ratio) == pytest.approx(math.log(effect.ratio) - math.log(effect.low))
    assert math.log(effect.high / effect.ratio) / se > 1.0 and effect.low > 1.0
    assert paired_log_effects(d[:, None], covariate=np.zeros(8))[0] == paired_log_effects(d[:, None])[0]


def test_with_a_covariate_the_sign_flip_test_stays_exact():
    """Every sign flip of one null data set (metric and covariate flipped together) is as likely as the observed
    one, so at most alpha of them may be called significant: with 2**8 patterns and alpha 0.01, at most 2."""
    rng = np.random.default_rng(3)
    c = rng.normal(0, 0.05, 8)
    d = np.column_stack([1.7 * c + rng.normal(0, 0.02, 8), rng.normal(0, 0.05, 8)])
    flips = 1 - 2 * ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1)
    significant = sum(any(e.significant for e in paired_log_effects(d * f[:, None], 0.01, covariate=c * f))
                      for f in flips)
    assert 1 <= significant <= 2


def test_a_covariate_whose_spread_is_rounding_is_left_out():
    """A constant calibration ratio computed per pair, log(1.1 b) - log(b), differs by ~1e-16 across pairs: that is
    no spread to fit a line on, so the change is judged on the ratios alone (it was read as an exact zero, x1.000
    [1.000, 1.000], whatever the ratios said)."""
    b = np.array([1.7, 2.3, 1.9, 2.8, 2.1, 1.6, 2.5, 2.2, 1.8, 2.0])
    c = np.log(1.1 * b) - np.log(b)
    assert np.ptp(c) > 0 and fittable_covariate(c, len(c)) is None
    d = np.log(1.1) + np.array([0.02, -0.01, 0.03, -0.02, 0.01, 0.0, -0.03, 0.02, 0.01, -0.01])
    (effect,) = paired_log_effects(d[:, None], covariate=c)
    assert effect == paired_log_effects(d[:, None])[0]
    assert effect.low > 1.05 and effect.ratio == pytest.approx(1.1, rel=0.01)
    assert fittable_covariate(np.array([0.1, -0.2, 0.05]), 3) is not None
    assert fittable_covariate(np.array([0.1, -0.2]), 2) is None
