"""Repeated replays of one trace through one engine, turned into a Measurement with samples per metric."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from pytest_kvcache.baselines import Measurement
from pytest_kvcache.memory import MemoryReport, MemoryWatcher
from pytest_kvcache.metrics import SLO, RunResult, serving_metrics
from pytest_kvcache.traces import Trace

MAX_ITL_SAMPLES = 400


class Engine(Protocol):
    """Anything that replays a trace: the hf engine or the vLLM engine."""

    def run(self, trace: Trace) -> RunResult: ...


@dataclass
class Round:
    result: RunResult
    memory: MemoryReport
    allocated_bytes: int | None = None
    recall: float | None = None


@dataclass
class Bench:
    """Runs rounds of a trace through an engine under a memory watcher and keeps every round."""

    engine: Engine
    trace: Trace
    device: torch.device
    slo: SLO = SLO()
    rounds: list[Round] = field(default_factory=list)

    def warmup(self) -> None:
        """One short replay (first requests, all at t=0) so one-time costs stay out of the samples."""
        self.engine.run(self.trace.head(min(4, len(self.trace))))

    def run_round(self) -> RunResult:
        with MemoryWatcher(self.device) as watcher:
            result = self.engine.run(self.trace)
        cache = getattr(self.engine, "cache", None)
        allocated = cache.allocated_bytes if cache is not None else None
        recall = cache.recall() if hasattr(cache, "recall") else None
        self.rounds.append(Round(result, watcher.report, allocated, recall))
        return result

    def metrics(self) -> dict[str, list[float]]:
        """Every metric as samples: latencies pooled per request over rounds, everything else one per round."""
        served = [serving_metrics(r.result, self.slo) for r in self.rounds]
        itl = [x for s in served for x in s.itl_ms]
        step = max(1, len(itl) // MAX_ITL_SAMPLES)
        out: dict[str, list[float]] = {
            "ttft_ms": [x for s in served for x in s.ttft_ms],
            "tpot_ms": [x for s in served for x in s.tpot_ms],
            "itl_ms": itl[::step],
            "e2e_ms": [x for s in served for x in s.e2e_ms],
            "request_throughput": [s.request_throughput for s in served],
            "output_throughput": [s.output_throughput for s in served],
            "goodput": [s.goodput for s in served],
            "output_tokens": [s.output_tokens for s in served],
        }
        counters = [r.result.counters for r in self.rounds]
        out["preemptions"] = [c.preemptions for c in counters]
        if all(r.result.kv_exact for r in self.rounds):
            out.update(
                kv_peak_bytes=[c.peak_resident_bytes for c in counters],
                kv_tokens_stored=[c.tokens_stored for c in counters],
                kv_tokens_evicted=[c.tokens_evicted for c in counters],
                kv_tokens_kept=[c.tokens_kept_final for c in counters],
                kv_bytes_to_host=[c.bytes_to_host for c in counters],
                kv_bytes_to_device=[c.bytes_to_device for c in counters],
            )
        for name in sorted({k for r in self.rounds for k in r.result.extra}):
            out[name] = [r.result.extra[name] for r in self.rounds if name in r.result.extra]
        if all(r.allocated_bytes is not None for r in self.rounds):
            out["kv_allocated_bytes"] = [r.allocated_bytes for r in self.rounds]
        recalls = [r.recall for r in self.rounds]
        if all(r is not None and r == r for r in recalls):
            out["speculation_recall"] = recalls
        if self.device.type == "cuda":
            out["peak_device_bytes"] = [r.memory.peak_device_bytes for r in self.rounds]
            out["allocator_peak_bytes"] = [r.memory.allocator_peak_bytes for r in self.rounds]
        else:
            out["rss_growth_bytes"] = [r.memory.peak_rss_bytes - r.memory.start_rss_bytes for r in self.rounds]
        return out

    def measurement(self, test_id: str, suite: str, config: dict, calibration_s: float, machine: dict) -> Measurement:
        return Measurement(test_id, suite, config, self.metrics(), calibration_s, machine)
