"""Statistics for regression detection, as pure functions over samples (after asv's step detection)."""

from __future__ import annotations

import numpy as np
from scipy.stats import mannwhitneyu

ALPHA = 0.01
MIN_SAMPLES_FOR_TEST = 8


def significance(baseline: list[float], current: list[float], alpha: float = ALPHA) -> tuple[bool, str]:
    """Whether two samples differ: Mann-Whitney U (two-sided) when both have >= 8 values, else complete
    separation (every current value beyond every baseline value), which is the strongest evidence few runs give."""
    if len(baseline) >= MIN_SAMPLES_FOR_TEST and len(current) >= MIN_SAMPLES_FOR_TEST:
        if np.ptp(baseline) == 0 and np.ptp(current) == 0:
            differ = baseline[0] != current[0]
            return differ, "constant samples"
        p = float(mannwhitneyu(current, baseline, alternative="two-sided").pvalue)
        return p < alpha, f"Mann-Whitney p={p:.2g}"
    separated = min(current) > max(baseline) or max(current) < min(baseline)
    return separated, f"{'separated' if separated else 'overlapping'} samples (n={len(baseline)}/{len(current)})"


def median(values: list[float]) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


def relative_change(baseline: float, current: float) -> float:
    """(current - baseline) / baseline; inf when the baseline is zero and the current is not."""
    if baseline == 0:
        return 0.0 if current == 0 else float("inf")
    return (current - baseline) / abs(baseline)
