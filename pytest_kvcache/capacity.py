"""Capacity under an SLO: the highest request rate at which a strategy still meets its TTFT and TPOT targets.

The search follows the serving benchmarks' rate sweeps (vLLM's `serve_sla`, GuideLLM's sweep): probe one rate at a
time with the same requests (only the arrival gaps scale), double the rate while the SLO holds, then bisect between
the last rate that met it and the first that did not, in log space (rates span orders of magnitude). A probe meets
the SLO when the p90 of its requests' TTFT and the p90 of their TPOT are both within the targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.metrics import SLO


@dataclass(frozen=True)
class Probe:
    """One replay at one rate and whether it met the SLO."""

    rate: float
    ttft_p90_ms: float
    tpot_p90_ms: float
    meets_slo: bool

    def to_json(self) -> dict:
        return asdict(self)


def meets(slo: SLO, ttft_p90_ms: float, tpot_p90_ms: float) -> bool:
    return ttft_p90_ms <= slo.ttft_ms and tpot_p90_ms <= slo.tpot_ms


@dataclass(frozen=True)
class Capacity:
    """The search's answer: `rate` (0.0 when even the lowest rate fails), whether it is only a lower bound (the
    highest rate probed still met the SLO), and every probe in the order it ran."""

    rate: float
    censored: bool
    probes: tuple[Probe, ...]


def search(probe: Callable[[float], Probe], low: float, high: float, bisections: int = 3) -> Capacity:
    """Highest rate in [low, high] whose probe meets the SLO: doubling from `low`, then `bisections` log-space
    bisection steps (each halves the ratio between the passing and the failing rate)."""
    if not 0 < low < high or math.isinf(high):
        raise KVConfigError(f"capacity search: need 0 < low < high < inf, got low={low}, high={high}")
    if bisections < 0:
        raise KVConfigError(f"capacity search: bisections must be >= 0, got {bisections}")
    probes: list[Probe] = []

    def run(rate: float) -> bool:
        probes.append(probe(rate))
        return probes[-1].meets_slo

    if not run(low):
        return Capacity(0.0, False, tuple(probes))
    good, bad = low, None
    while bad is None:
        rate = min(2 * good, high)
        if run(rate):
            good = rate
            if rate == high:
                return Capacity(good, True, tuple(probes))
        else:
            bad = rate
    for _ in range(bisections):
        rate = math.sqrt(good * bad)
        if run(rate):
            good = rate
        else:
            bad = rate
    return Capacity(good, False, tuple(probes))
