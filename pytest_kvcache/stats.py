"""Statistics behind verdicts, as pure functions over independent samples (after pyperf's `_utils` and asv's `_stats`).

A sample is one independent repeat: a session (one pytest process) in `kvbench compare`, a round inside one
session. Per-request values are never samples: a request's latency is set by its place in the trace (its
intra-class correlation across rounds is 0.74-1.00 on the tiny model), so pooling them over rounds multiplies the
sample count without adding information.

Two comparisons, both on the log scale (speed changes are multiplicative):

- `paired_effects` / `paired_log_effects`: base and head measured in pairs of sessions (kvbench compare, whose
  pairs interleave their rounds). Each pair gives one log ratio head/base of every metric. With the order inside each pair chosen at random, a pair's sign is
  exchangeable when nothing changed, so flipping the signs of whole pairs gives the exact null distribution of the
  largest |t| over the test's metrics: the intervals are simultaneous over the metrics (family-wise error `alpha`
  per test, whatever their correlation). The smallest p-value n pairs can give is 2 / 2**n: `min_pairs` is the
  documented minimum sample size, and below it every interval is unbounded (no claim is made).
- `session_effect`: a stored baseline against one new session. Rounds inside one session share that process's
  offset (medians of separate processes differ by about +-10% on a quiet 2-core machine), so between sessions the
  independent sample is the session, one per side: the interval adds an assumed between-session noise
  (`session_sd`, measured by `benchmarks/gate_experiments.py`) to the spread of the rounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

ALPHA = 0.01  # family-wise error per test, over its metrics (and over the looks of an adaptive compare)
MAX_FLIPS = 20_000  # exact enumeration of sign patterns up to this many, else a seeded random subset


@dataclass(frozen=True)
class Effect:
    """Change head / base of one metric: point estimate, interval at `confidence`, and how it was obtained."""

    ratio: float
    low: float
    high: float
    confidence: float
    n: int
    method: str

    @property
    def significant(self) -> bool:
        return self.low > 1.0 or self.high < 1.0

    def describe(self) -> str:
        return f"x{self.ratio:.3f}, {self.confidence:.2%} CI [{self.low:.3f}, {self.high:.3f}], {self.method}"


def min_pvalue_sign_flip(n: int) -> float:
    """Smallest two-sided p-value of a sign-flip test on n pairs: the observed signs and their mirror image."""
    return min(1.0, 2.0 / 2.0**n)


def min_pairs(alpha: float = ALPHA) -> int:
    """Fewest pairs whose sign-flip test can reach `alpha` (8 for 0.01): fewer pairs give no verdict."""
    return max(1, math.ceil(math.log2(2.0 / alpha)))


def _sign_patterns(n: int, seed: int) -> np.ndarray:
    """(F, n) matrix of +-1: every pattern when 2**n <= MAX_FLIPS, else the identity plus seeded random ones."""
    if 2**n <= MAX_FLIPS:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1
        return 1 - 2 * bits
    rng = np.random.default_rng(seed)
    flips = rng.choice(np.array([-1, 1]), size=(MAX_FLIPS, n))
    flips[0] = 1
    return flips


def _estimates(d: np.ndarray, flips: np.ndarray, c: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(estimates, standard errors), each (F, m), over sign-flipped pairs: of the mean of d's rows (n, m) or, with
    a covariate c (n,) flipped alongside, of the intercept of each column's least-squares line on c (its value at
    c = 0: both processes found the machine equally fast)."""
    n = d.shape[0]
    means = flips @ d / n
    syy = np.maximum((d**2).sum(axis=0) - n * means**2, 0.0)
    if c is None:
        estimates, var = means, syy / (n - 1) / n
    else:
        # flipping a pair negates its ratio and its covariate alike: x @ x and x @ d stay, only the means move
        cbar = (flips @ c / n)[:, None]
        sxx = c @ c - n * cbar**2
        sxd = (c @ d)[None, :] - n * cbar * means
        degenerate = sxx <= 1e-12 * (c @ c)  # every flipped covariate equal: no line (counted as t = 0)
        sxx = np.where(degenerate, 1.0, sxx)
        slope = sxd / sxx
        estimates = np.where(degenerate, 0.0, means - slope * cbar)
        rss = np.maximum(syy - slope * sxd, 0.0)
        var = np.where(degenerate, 0.0, rss / (n - 2) * (1 / n + cbar**2 / sxx))
    # rounding leaves ~1e-17 where a line fits exactly: read it as the 0 it is, or one flip's t is +-inf
    tol = 1e-9 * np.sqrt((d**2).mean(axis=0))
    se = np.sqrt(var)
    return np.where(np.abs(estimates) <= tol, 0.0, estimates), np.where(se <= tol, 0.0, se)


def _t(estimates: np.ndarray, se: np.ndarray) -> np.ndarray:
    """t statistics; a zero spread gives 0 or +-inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(se > 0, estimates / se, np.where(estimates == 0, 0.0, np.sign(estimates) * np.inf))


def paired_effects(base: Sequence[Sequence[float]], head: Sequence[Sequence[float]], alpha: float = ALPHA,
                   seed: int = 0) -> list[Effect]:
    """Simultaneous intervals for head/base of m metrics from n pairs of sessions (rows: pairs, columns: metrics).

    Values must be > 0. The interval of metric j is exp(mean_j +- c * se_j) of the per-pair log ratios, with c the
    (1 - alpha) quantile of max_j |t_j| over sign flips of whole pairs; with fewer than `min_pairs(alpha)` pairs
    the intervals are (0, inf).
    """
    b, h = np.asarray(base, dtype=float), np.asarray(head, dtype=float)
    if b.shape != h.shape or b.ndim != 2 or b.shape[0] < 1:
        raise ValueError(f"base and head must be (pairs, metrics) of one shape, got {b.shape} and {h.shape}")
    if (b <= 0).any() or (h <= 0).any() or not (np.isfinite(b).all() and np.isfinite(h).all()):
        raise ValueError("paired_effects needs finite values > 0")
    return paired_log_effects(np.log(h) - np.log(b), alpha, seed)


def paired_log_effects(d: np.ndarray | Sequence[Sequence[float]], alpha: float = ALPHA, seed: int = 0,
                       covariate: Sequence[float] | None = None) -> list[Effect]:
    """`paired_effects` from the per-pair log ratios head/base directly (rows: pairs, columns: metrics): for pairs
    whose rounds were interleaved, a pair's log ratio is the mean over its rounds of round-by-round log ratios.

    With a `covariate` (one value per pair, negated when the pair's sides are swapped, such as the log ratio of the
    two processes' calibration), each metric's estimate is the intercept of its least-squares line on the covariate
    (ANCOVA, as CUPED adjusts by a pre-period metric): the change with the processes' speed offset taken out, its
    standard error the intercept's (n - 2 degrees of freedom, with the covariate's mean in it). The line is fitted
    again for every sign flip, so the max-t null distribution stays exact. A line through the origin instead would
    take a real change as slope wherever the covariate's pairs lean one way (one disturbed calibration point made a
    4x slowdown `unknown`). A covariate without spread is left out."""
    d = np.asarray(d, dtype=float)
    if d.ndim != 2 or d.shape[0] < 1 or not np.isfinite(d).all():
        raise ValueError(f"log ratios must be a finite (pairs, metrics) matrix, got shape {d.shape}")
    n, m = d.shape
    c = fittable_covariate(covariate, n)
    method = f"paired sessions, n={n}"
    if n < min_pairs(alpha):
        mean = d.mean(axis=0) if c is None else d.mean(axis=0) - _slopes(d, c) * c.mean()
        return [Effect(math.exp(x), 0.0, math.inf, 1 - alpha, n, f"{method} < {min_pairs(alpha)} pairs needed")
                for x in mean]
    flips = _sign_patterns(n, seed)
    estimates, se = _estimates(d, flips, c)
    max_t = np.sort(np.abs(_t(estimates, se)).max(axis=1))[::-1]
    critical = max_t[math.floor(alpha * len(max_t))]
    label = f"{method}, sign-flip max-t over {m} metric{'s' if m > 1 else ''}"
    effects = []
    for x, s in zip(estimates[0], se[0]):  # row 0 of the sign patterns is the observed one (no flip)
        half = critical * s if s > 0 else 0.0
        low, high = (math.exp(x - half), math.exp(x + half)) if math.isfinite(half) else (0.0, math.inf)
        effects.append(Effect(math.exp(x), low, high, 1 - alpha, n, label))
    return effects


def fittable_covariate(c: Sequence[float] | None, n: int) -> np.ndarray | None:
    """The covariate as an array, or None when there is none or it has no spread to fit a line on: fewer than 3
    pairs, or a spread that is rounding (a constant ratio such as log(1.1 b) - log(b) differs by ~1e-16; _estimates
    reads the same criterion as degenerate, so the observed fit never is)."""
    if c is None:
        return None
    x = np.asarray(c, dtype=float)
    if x.shape != (n,) or not np.isfinite(x).all():
        raise ValueError(f"need one finite covariate per pair, got {x.shape} for {n} pairs")
    centred = x - x.mean()
    return x if n > 2 and centred @ centred > 1e-12 * (x @ x) else None


def _slopes(d: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Each column's least-squares slope on x, with an intercept (x has spread)."""
    xc = x - x.mean()
    return xc @ (d - d.mean(axis=0)) / (xc @ xc)


def remove_covariate(d: np.ndarray | Sequence[Sequence[float]], c: Sequence[float]) -> tuple[np.ndarray, list[float]]:
    """Per-pair log ratios (rows: pairs, columns: metrics) less their least-squares slope on a covariate measured in
    the same pairs, fitted with an intercept as `paired_log_effects` does, and the slopes: the adjusted ratios'
    mean is its estimate and their SD its residual spread. A covariate without spread leaves the ratios as they
    are."""
    d = np.asarray(d, dtype=float)
    if d.ndim != 2:
        raise ValueError(f"log ratios must be a (pairs, metrics) matrix, got shape {d.shape}")
    x = fittable_covariate(c, d.shape[0])
    if x is None:
        return d, [0.0] * d.shape[1]
    slopes = _slopes(d, x)
    return d - np.outer(x, slopes), [float(b) for b in slopes]


def session_effect(base: Sequence[float], head: Sequence[float], session_sd: float, alpha: float = ALPHA) -> Effect:
    """head/base between two sessions: the ratio of round medians, with an interval that adds `session_sd`
    (log-scale SD of one session's offset) for each side to the spread of the rounds. Values must be > 0."""
    lb, lh = np.log(np.asarray(base, dtype=float)), np.log(np.asarray(head, dtype=float))
    if not (np.isfinite(lb).all() and np.isfinite(lh).all()) or len(lb) == 0 or len(lh) == 0:
        raise ValueError("session_effect needs non-empty finite values > 0")
    estimate = float(np.log(np.median(np.exp(lh))) - np.log(np.median(np.exp(lb))))
    var = 2 * session_sd**2
    var += float(lb.var(ddof=1)) / len(lb) if len(lb) > 1 else 0.0
    var += float(lh.var(ddof=1)) / len(lh) if len(lh) > 1 else 0.0
    half = NormalDist().inv_cdf(1 - alpha / 2) * math.sqrt(var)
    method = f"one session per side ({len(lb)}/{len(lh)} rounds), between-session noise {session_sd:.0%}"
    return Effect(math.exp(estimate), math.exp(estimate - half), math.exp(estimate + half), 1 - alpha,
                  1, method)


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


def relative_change(baseline: float, current: float) -> float:
    """(current - baseline) / |baseline|; inf when the baseline is zero and the current is not."""
    if baseline == 0:
        return 0.0 if current == 0 else math.inf
    return (current - baseline) / abs(baseline)
