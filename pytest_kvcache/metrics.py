"""Per-request records and the serving metrics computed from them (definitions follow vLLM's benchmark tool)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class KVCounters:
    """Exact KV bookkeeping reported by a strategy; bytes count K and V of every layer."""

    tokens_stored: int = 0
    tokens_evicted: int = 0
    tokens_kept_final: int = 0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0
    bytes_to_host: int = 0
    bytes_to_device: int = 0
    preemptions: int = 0

    def add_resident(self, nbytes: int) -> None:
        self.resident_bytes += nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)


@dataclass
class RequestRecord:
    """What happened to one request; times are seconds since the run started (the trace's t=0)."""

    id: str
    arrival_s: float
    prompt_tokens: int
    output_ids: list[int] = field(default_factory=list)
    token_times_s: list[float] = field(default_factory=list)
    scheduled_s: float | None = None
    success: bool = True
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def ttft_s(self) -> float:
        return self.token_times_s[0] - self.arrival_s

    @property
    def e2e_s(self) -> float:
        return self.token_times_s[-1] - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        return list(np.diff(self.token_times_s))


@dataclass
class RunResult:
    """One replay of a trace: its records, wall duration and the strategy's counters (kv_exact: whether the
    engine reports exact KV counters; vLLM reports preemptions only) plus engine-specific metrics."""

    records: list[RequestRecord]
    duration_s: float
    counters: KVCounters
    extra: dict[str, float] = field(default_factory=dict)
    kv_exact: bool = True


@dataclass(frozen=True)
class SLO:
    """Service-level objectives that decide goodput, in milliseconds."""

    ttft_ms: float = 2000.0
    tpot_ms: float = 200.0


def percentiles(values: list[float]) -> dict[str, float]:
    """mean, median, p90 and p99 of a sample, as vLLM reports them."""
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p90": float("nan"), "p99": float("nan")}
    arr = np.asarray(values, dtype=float)
    return {
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
    }


@dataclass
class ServingMetrics:
    """Latency samples (ms, one per request; ITL one per token gap) and rates of one run."""

    ttft_ms: list[float]
    tpot_ms: list[float]
    itl_ms: list[float]
    e2e_ms: list[float]
    completed: int
    failed: int
    output_tokens: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    goodput: float


def serving_metrics(result: RunResult, slo: SLO = SLO()) -> ServingMetrics:
    """Compute TTFT, TPOT, ITL, E2E, throughput and goodput from one run's records."""
    done = [r for r in result.records if r.success and r.token_times_s]
    ttft = [r.ttft_s * 1e3 for r in done]
    tpot = [r.tpot_s * 1e3 for r in done if r.tpot_s is not None]
    itl = [gap * 1e3 for r in done for gap in r.itl_s]
    e2e = [r.e2e_s * 1e3 for r in done]
    good = sum(
        1
        for r in done
        if r.ttft_s * 1e3 <= slo.ttft_ms and (r.tpot_s is None or r.tpot_s * 1e3 <= slo.tpot_ms)
    )
    out_tokens = sum(r.output_tokens for r in done)
    duration = result.duration_s
    return ServingMetrics(
        ttft_ms=ttft,
        tpot_ms=tpot,
        itl_ms=itl,
        e2e_ms=e2e,
        completed=len(done),
        failed=len(result.records) - len(done),
        output_tokens=out_tokens,
        duration_s=duration,
        request_throughput=len(done) / duration if duration > 0 else 0.0,
        output_throughput=out_tokens / duration if duration > 0 else 0.0,
        goodput=good / duration if duration > 0 else 0.0,
    )
