"""Statistics behind a verdict: when two sets of timings count as different."""

from math import comb

import pytest

from pytest_kvcache.stats import MIN_SAMPLES_FOR_TEST, median, relative_change, significance


def test_few_samples_need_complete_separation():
    """With fewer than 8 runs only non-overlapping samples count as evidence (asv's rule)."""
    base = [10.0, 11.0, 12.0]
    assert significance(base, [12.5, 13.0, 14.0]) == (True, "separated samples (n=3/3)")
    assert significance(base, [7.0, 8.0, 9.5])[0] is True
    assert significance(base, [11.5, 20.0, 30.0]) == (False, "overlapping samples (n=3/3)")


def test_many_samples_use_mann_whitney_exact_p():
    """8+ runs use a two-sided Mann-Whitney U; fully separated 8 vs 8 has exact p = 2 / C(16, 8)."""
    base = [float(x) for x in range(8)]
    current = [x + 7.5 for x in base]
    significant, how = significance(base, current)
    assert significant is True
    assert how == f"Mann-Whitney p={2 / comb(16, 8):.2g}"


def test_mann_whitney_accepts_a_small_overlap_that_separation_would_not():
    """At the switch to 8 samples, a shift with one overlapping value becomes significant evidence."""
    n = MIN_SAMPLES_FOR_TEST
    base7 = [float(x) for x in range(n - 1)]
    cur7 = [n - 2.5] + [x + n for x in base7[1:]]  # one current value inside the baseline range
    assert significance(base7, cur7) == (False, f"overlapping samples (n={n - 1}/{n - 1})")
    base8 = [float(x) for x in range(n)]
    cur8 = [n - 1.5] + [x + n + 1 for x in base8[1:]]
    significant, how = significance(base8, cur8)
    assert significant is True and how.startswith("Mann-Whitney")


def test_same_distribution_is_not_significant():
    """Interleaved samples from one distribution must never read as a change."""
    base = [10.0, 10.2, 9.9, 10.1, 10.05, 9.95, 10.15, 9.85, 10.12, 9.88]
    current = [10.01, 10.19, 9.91, 10.09, 10.04, 9.96, 10.14, 9.86, 10.11, 9.89]
    assert significance(base, current)[0] is False


def test_constant_samples():
    """Constant samples (exact counters, clock-limited timings) differ exactly when their values differ."""
    assert significance([5.0] * 8, [5.0] * 8) == (False, "constant samples")
    assert significance([5.0] * 8, [6.0] * 8) == (True, "constant samples")


def test_median_and_relative_change():
    """Representative value and change definitions, including a zero baseline."""
    assert median([3.0, 1.0, 2.0, 10.0]) == 2.5
    assert relative_change(10.0, 15.0) == pytest.approx(0.5)
    assert relative_change(10.0, 5.0) == pytest.approx(-0.5)
    assert relative_change(-10.0, -5.0) == pytest.approx(0.5)
    assert relative_change(0.0, 0.0) == 0.0
    assert relative_change(0.0, 1.0) == float("inf")
