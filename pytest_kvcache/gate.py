"""The one gate: per-metric verdicts for the pytest gate and `kvbench diff` (a stored baseline against one
session) and for `kvbench compare` (paired sessions of base and head), from the metric registry's rules and the
per-test thresholds.

A time or rate metric regresses only when its change is above the threshold AND significant (the interval of the
ratio excludes 1); it is unchanged when the whole interval lies within +-threshold, unknown otherwise. Exact
counters must match exactly; memory, counts and scores compare against a tolerance. Another configuration (hash)
makes every metric "not comparable"; another machine fingerprint, rounds that other processes kept waiting for a
CPU (bench.py), or a calibration ratio outside CALIBRATION_RANGE make the machine-dependent metrics "not
comparable" instead of passing or failing them; latency tails (p90/p99) are compared only within their narrower
calibration range (metrics.TAIL_CALIBRATION_RANGE).

Both gates correct time metrics by the in-process calibration: against a stored baseline by the ratio of the two
calibrations; between paired sessions by taking each metric's change at equal calibration, the intercept of its
line on the pairs' calibration ratios (a process's speed offset shows in its calibration too:
benchmarks/results/gate-decode2.md; stats.paired_log_effects), unless the head moved the calibration itself
(CALIBRATION_SHIFT), which then judges raw times.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from pytest_kvcache.machine import fingerprint_mismatch
from pytest_kvcache.metrics import CALIBRATION_RANGE, METRICS, Metric, metric
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
    representative,
)
from pytest_kvcache.stats import (
    ALPHA,
    Effect,
    fittable_covariate,
    median,
    paired_log_effects,
    relative_change,
    remove_covariate,
    session_effect,
)

SCORE_EPSILON = 1e-6  # stored samples keep 6 significant digits: 2/3 is 0.666667
CALIBRATION_SHIFT = 0.05  # a head whose own calibration moved more than this is judged on raw times
SESSION_SD = 0.15  # between-session noise assumed by the stored-baseline gate (benchmarks/results/aa.md)


def threshold(name: str, overrides: dict[str, float]) -> float:
    return float(overrides.get(name, metric(name).threshold))


def judge_effect(rule: Metric, effect: Effect, limit: float) -> str:
    """regressed: significant and worse beyond the threshold; unchanged: the interval within +-threshold."""
    if rule.higher_is_better:
        worse, low, high = 1 / effect.ratio, 1 / effect.high, math.inf if effect.low == 0 else 1 / effect.low
    else:
        worse, low, high = effect.ratio, effect.low, effect.high
    bound = 1 + limit
    if low > 1 and worse > bound:
        return REGRESSED
    if high < 1 and worse < 1 / bound:
        return IMPROVED
    if low >= 1 / bound and high <= bound:
        return UNCHANGED
    return UNKNOWN


def judge_tolerance(rule: Metric, base: float, current: float, limit: float) -> tuple[str, str]:
    """Memory and counts: a relative tolerance plus the metric's absolute slack; scores: an absolute tolerance."""
    if rule.kind == "score":
        delta = current - base
        bad = -delta if rule.higher_is_better else delta
        slack = limit + SCORE_EPSILON
        return (REGRESSED if bad > slack else IMPROVED if -bad > slack else UNCHANGED), f"absolute change {delta:+.4g}"
    change = relative_change(base, current)
    worse = change < 0 if rule.higher_is_better else change > 0
    beyond = abs(change) > limit and abs(current - base) > rule.slack
    return ((REGRESSED if worse else IMPROVED) if beyond else UNCHANGED), "tolerance"


def judge_exact(base: Sequence[float], current: Sequence[float]) -> tuple[str, str]:
    """Every sample of both sides must be one and the same value."""
    values_b, values_c = sorted(set(base)), sorted(set(current))
    if len(values_b) == 1 and values_b == values_c:
        return UNCHANGED, "exact match"
    return REGRESSED, f"exact counter changed: {_values(values_b)} -> {_values(values_c)}"


def _values(values: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _order(names: set[str]) -> list[str]:
    return sorted(names, key=list(METRICS).index)


def config_differences(base: dict, current: dict) -> str:
    """'rounds: 3 -> 5; trace.seed: 1 -> 2' for the keys that differ (nested one level)."""
    diffs = []
    for key in sorted(set(base) | set(current)):
        b, c = base.get(key), current.get(key)
        if isinstance(b, dict) and isinstance(c, dict):
            diffs += [f"{key}.{k}: {b.get(k)!r} -> {c.get(k)!r}" for k in sorted(set(b) | set(c)) if b.get(k) != c.get(k)]
        elif b != c:
            diffs.append(f"{key}: {b!r} -> {c!r}")
    return "; ".join(diffs)


def _not_comparable(names: set[str], base: Measurement, current: Measurement, why: str) -> list[Verdict]:
    return [Verdict(n, NOT_COMPARABLE, _summary(base, n), _summary(current, n), None, 0.0, why) for n in _order(names)]


def _summary(m: Measurement, name: str) -> float | None:
    return m.summary(name) if m.metrics.get(name) else None


def machine_reason(baseline: Measurement, current: Measurement) -> tuple[str | None, float]:
    """Why machine-dependent metrics cannot be compared (None: they can), and the calibration scale to apply."""
    diff = fingerprint_mismatch(baseline.machine, current.machine)
    if diff:
        return f"baseline from another machine ({'; '.join(diff)})", 1.0
    disturbed = {side: m.info.get("still_disturbed", 0) for side, m in (("baseline", baseline), ("now", current))}
    if any(disturbed.values()):
        counts = ", ".join(f"{n} of the {side} rounds" if side == "baseline" else f"{n} now"
                           for side, n in disturbed.items() if n)
        return f"other processes took this CPU during rounds ({counts}): timings disturbed", 1.0
    if baseline.calibration_s is None or current.calibration_s is None:
        return None, 1.0
    scale = baseline.calibration_s / current.calibration_s
    low, high = CALIBRATION_RANGE
    if not low <= scale <= high:
        return (f"calibration ratio x{scale:.3g} (baseline {baseline.calibration_s * 1e3:.3g} ms, now "
                f"{current.calibration_s * 1e3:.3g} ms) outside [{low:g}, {high:g}]"), 1.0
    return None, scale


def gate(baseline: Measurement | None, current: Measurement, thresholds: dict[str, float] | None = None,
         session_sd: float = SESSION_SD, alpha: float = ALPHA) -> list[Verdict]:
    """A stored baseline against this session: the verdicts of the pytest gate and of `kvbench diff`."""
    thresholds = thresholds or {}
    if baseline is None:
        return [Verdict(n, NEW, None, current.summary(n), None, 0.0) for n in _order(set(current.metrics))]
    names = set(baseline.metrics) | set(current.metrics)
    if baseline.config_hash != current.config_hash:
        why = f"configuration differs ({config_differences(baseline.config, current.config)})"
        return _not_comparable(names, baseline, current, why)
    reason, scale = machine_reason(baseline, current)

    def why_not(rule: Metric) -> str | None:
        """Why this machine-dependent metric is not compared at this calibration (None: it is)."""
        if not rule.machine_dependent:
            return None
        low, high = rule.calibration_range
        if reason is None and not low <= scale <= high:
            return (f"calibration ratio x{scale:.3g} outside [{low:g}, {high:g}], the range for latency tails (the "
                    f"share of gaps with a prefill in them shifts with the machine's speed)")
        return reason

    common = set(baseline.metrics) & set(current.metrics)
    statistical = [n for n in common if metric(n).statistical and not why_not(metric(n))]
    family_alpha = alpha / max(1, len(statistical))
    verdicts = []
    for name in _order(names):
        rule = metric(name)
        if name not in current.metrics:
            verdicts.append(Verdict(name, MISSING, baseline.summary(name), None, None, 0.0, "not measured now"))
        elif name not in baseline.metrics:
            verdicts.append(Verdict(name, NEW, None, current.summary(name), None, 0.0))
        elif why := why_not(rule):
            verdicts.append(Verdict(name, NOT_COMPARABLE, baseline.summary(name), current.summary(name), None, 0.0,
                                    why))
        elif rule.history_dependent:
            before, now = baseline.summary(name), current.summary(name)
            verdicts.append(Verdict(name, UNKNOWN, before, now, relative_change(before, now), 0.0,
                                    "depends on what ran before in the process: gated through "
                                    "allocator_peak_growth_bytes"))
        else:
            samples = _scaled(rule, current.metrics[name], scale)
            verdicts.append(_verdict(name, baseline.metrics[name], samples, threshold(name, thresholds),
                                     lambda b, c: session_effect(b, c, session_sd, family_alpha),
                                     "" if scale == 1.0 else f"; calibration x{scale:.3f}"))
    return verdicts


def _scaled(rule: Metric, samples: list[float], scale: float) -> list[float]:
    if rule.kind == "time":
        return [s * scale for s in samples]
    if rule.kind == "rate":
        return [s / scale for s in samples]
    return list(samples)


def _verdict(name: str, base: list[float], current: list[float], limit: float, estimate, note: str = "") -> Verdict:
    """One metric's verdict from its two sides' samples; `estimate(base, current)` gives the Effect."""
    rule = metric(name)
    base_value, cur_value = representative(name, base), representative(name, current)
    change = relative_change(base_value, cur_value)
    if rule.kind == "exact":
        status, detail = judge_exact(base, current)
        return Verdict(name, status, base_value, cur_value, change, 0.0, detail)
    if not rule.statistical:
        status, detail = judge_tolerance(rule, base_value, cur_value, limit)
        return Verdict(name, status, base_value, cur_value, change, limit, detail)
    if min(base) <= 0 or min(current) <= 0:
        same = max(base) == max(current) == 0
        return Verdict(name, UNCHANGED if same else UNKNOWN, base_value, cur_value, change, limit,
                       "all zero" if same else "values <= 0: no ratio")
    effect = estimate(base, current)
    return Verdict(name, judge_effect(rule, effect, limit), base_value, cur_value, effect.ratio - 1, limit,
                   effect.describe() + note, effect.low, effect.high)


def round_speeds(m: Measurement) -> list[float] | None:
    """Per round, the log of the calibration time around it (mean log of the points before and after): how fast
    this process found the machine while it ran that round; None without a point on each side of every round."""
    points = m.info.get("calibration_points_s") or []
    rounds = max((len(v) for v in m.metrics.values()), default=0)
    if len(points) != rounds + 1 or min(points, default=0) <= 0:
        return None
    logs = [math.log(p) for p in points]
    return [(a + b) / 2 for a, b in itertools.pairwise(logs)]


def pair_log_ratio(base: list[float], head: list[float]) -> float:
    """One pair's log ratio head/base: the mean of round-by-round log ratios when both sessions have the same rounds
    (kvbench compare interleaves them, round i of one next to round i of the other, so both share the machine's
    drift: benchmarks/results/gate-interleaved.md), else the log ratio of the sessions' medians."""
    if len(base) == len(head) and min(base) > 0 and min(head) > 0:
        return sum(math.log(h / b) for b, h in zip(base, head)) / len(base)
    return math.log(median(head) / median(base))


def pair_speed_ratio(base: Measurement, head: Measurement) -> float | None:
    """One pair's log ratio head/base of the calibration around its rounds (None where a side lacks it): how much
    slower the head's process found the machine than the base's while they ran."""
    sb, sh = round_speeds(base), round_speeds(head)
    if sb is None or sh is None or not sb or not sh:
        return None
    return sum(sh) / len(sh) - sum(sb) / len(sb)


def calibration_covariate(base: list[Measurement], head: list[Measurement], alpha: float, seed: int
                          ) -> tuple[list[float] | None, str]:
    """Every pair's pair_speed_ratio, or None (and why) when a side lacks it or the head changed the calibration
    itself beyond CALIBRATION_SHIFT: then times are judged raw, so a head that slows the whole process is seen."""
    shifts = [pair_speed_ratio(b, h) for b, h in zip(base, head)]
    if any(c is None for c in shifts):
        return None, "; raw times (no calibration around every round)"
    effect = paired_log_effects([[c] for c in shifts], alpha, seed)[0]
    if effect.significant and abs(effect.ratio - 1) > CALIBRATION_SHIFT:
        return None, f"; raw times: the head's calibration is x{effect.ratio:.3f} the base's"
    if fittable_covariate(shifts, len(shifts)) is None:
        return None, "; raw times (the calibration ratios have no spread to fit a line on)"
    return shifts, ""


def paired(base: list[Measurement], head: list[Measurement], thresholds: dict[str, float] | None = None,
           alpha: float = ALPHA, seed: int = 0) -> list[Verdict]:
    """kvbench compare: one test's sessions of base and head, pair by pair (base[i] ran next to head[i])."""
    thresholds = thresholds or {}
    if len(base) != len(head) or not base:
        raise ValueError(f"paired() needs as many base as head sessions (>= 1), got {len(base)} and {len(head)}")
    names = set().union(*(m.metrics for m in base + head))
    hashes = {m.config_hash for m in base + head}
    if len(hashes) > 1:
        why = f"configuration differs ({config_differences(base[0].config, head[0].config)})"
        return _not_comparable(names, base[0], head[0], why)
    on_base = set.intersection(*(set(m.metrics) for m in base))
    on_head = set.intersection(*(set(m.metrics) for m in head))
    session_values = {n: ([median(m.metrics[n]) for m in base], [median(m.metrics[n]) for m in head])
                      for n in on_base & on_head if metric(n).statistical}
    family = [n for n, (b, h) in session_values.items() if min(b) > 0 and min(h) > 0]
    effects, notes = {}, {}
    if family:
        shifts, note = calibration_covariate(base, head, alpha, seed)
        d = np.array([[pair_log_ratio(b.metrics[n], h.metrics[n]) for n in family] for b, h in zip(base, head)])
        if shifts is None:
            notes = dict.fromkeys(family, note)
        else:
            _, slopes = remove_covariate(d, shifts)
            notes = {n: f"; adjusted for the calibration (slope {b:.2f})" for n, b in zip(family, slopes)}
        effects = dict(zip(family, paired_log_effects(d, alpha, seed, covariate=shifts)))
    verdicts = []
    for name in _order(names):
        if name not in on_head:
            verdicts.append(Verdict(name, MISSING, None, None, None, 0.0, "not measured by every head session"))
        elif name not in on_base:
            verdicts.append(Verdict(name, NEW, None, None, None, 0.0, "not measured by every base session"))
        elif name in session_values:
            b, h = session_values[name]
            verdicts.append(_verdict(name, b, h, threshold(name, thresholds), lambda *_, n=name: effects[n],
                                     notes.get(name, "")))
        else:
            b = [s for m in base for s in m.metrics[name]]
            h = [s for m in head for s in m.metrics[name]]
            if metric(name).kind != "exact":
                b = [representative(name, m.metrics[name]) for m in base]
                h = [representative(name, m.metrics[name]) for m in head]
                b, h = [median(b)], [median(h)]
            verdicts.append(_verdict(name, b, h, threshold(name, thresholds), None))
    return verdicts
