"""Repeated replays of one trace through one engine; each round is summarised into one sample per metric.

A round's summary is the sample (median, p90 and p99 of its requests' TTFT, TPOT, ITL and E2E; its rates, CPU time
per output token, counters and memory peaks): requests inside a round are not independent repeats. The calibration
workload runs before the first round and after every round (its median is the measurement's calibration), and a
round whose thread waited for a CPU too long (machine.DISTURBED_FRACTION) is measured again on a quieter CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import psutil

from pytest_kvcache import turns
from pytest_kvcache.machine import DISTURBED_FRACTION, CpuPin, run_delay_s
from pytest_kvcache.memory import MemoryReport, MemoryWatcher
from pytest_kvcache.metrics import SLO, RunResult, metric, percentiles, serving_metrics
from pytest_kvcache.results import Measurement
from pytest_kvcache.stats import median
from pytest_kvcache.traces import Trace

MAX_ATTEMPTS = 3  # tries per round when rounds keep being disturbed; the last one is kept either way
FUTILE_RETRIES = 3  # retries in a row that were disturbed again: no quiet CPU, stop retrying until a quiet round


class Engine(Protocol):
    """Anything that replays a trace: the hf engine or the vLLM engine."""

    def run(self, trace: Trace) -> RunResult: ...


def cpu_seconds() -> float:
    """CPU time of this process and its children (the vLLM engine runs in a worker process)."""
    total = time.process_time()
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


@dataclass
class Round:
    """One timed replay and what was observed around it."""

    result: RunResult
    memory: MemoryReport
    wall_s: float
    cpu_s: float
    run_delay_s: float | None
    cpu: int | None
    allocated_bytes: int | None = None
    recall: float | None = None

    @property
    def disturbed(self) -> bool:
        return self.run_delay_s is not None and self.run_delay_s > DISTURBED_FRACTION * self.wall_s


def round_metrics(r: Round, slo: SLO, device: str) -> dict[str, float]:
    """The round's summary: one value per metric."""
    served = serving_metrics(r.result, slo)
    out: dict[str, float] = {}
    for short, values in (("ttft", served.ttft_ms), ("tpot", served.tpot_ms), ("itl", served.itl_ms),
                          ("e2e", served.e2e_ms)):
        if values:
            p = percentiles(values)
            out.update({f"{short}_ms": p["median"], f"{short}_p90_ms": p["p90"], f"{short}_p99_ms": p["p99"]})
    out.update(request_throughput=served.request_throughput, output_throughput=served.output_throughput,
               goodput=served.goodput, output_tokens=served.output_tokens,
               preemptions=r.result.counters.preemptions)
    if served.output_tokens:
        out["cpu_ms_per_token"] = r.cpu_s * 1e3 / served.output_tokens
    c = r.result.counters
    if r.result.kv_exact:
        out.update(kv_peak_bytes=c.peak_resident_bytes, kv_tokens_stored=c.tokens_stored,
                   kv_tokens_evicted=c.tokens_evicted, kv_tokens_kept=c.tokens_kept_final,
                   kv_bytes_to_host=c.bytes_to_host, kv_bytes_to_device=c.bytes_to_device)
    for name, value in r.result.extra.items():
        metric(name)
        out[name] = value
    if r.allocated_bytes is not None:
        out["kv_allocated_bytes"] = r.allocated_bytes
    if r.recall is not None and r.recall == r.recall:
        out["speculation_recall"] = r.recall
    if device.startswith("cuda"):
        out["peak_device_bytes"] = r.memory.peak_device_bytes
        out["allocator_peak_bytes"] = r.memory.allocator_peak_bytes
        out["peak_device_growth_bytes"] = r.memory.peak_device_growth_bytes
        out["allocator_peak_growth_bytes"] = r.memory.allocator_peak_growth_bytes
        out["reserved_peak_growth_bytes"] = r.memory.reserved_peak_growth_bytes
        out["outside_allocator_growth_bytes"] = r.memory.outside_allocator_growth_bytes
    else:
        out["rss_growth_bytes"] = r.memory.peak_rss_bytes - r.memory.start_rss_bytes
    return out


@dataclass
class Bench:
    """Runs rounds of a trace through an engine under a memory watcher and keeps every round."""

    engine: Engine
    trace: Trace
    device: str = "cpu"
    slo: SLO = SLO()
    pin: CpuPin | None = None
    calibrate: Callable[[], float] | None = None
    label: str = ""  # the test's id: where `kvbench compare` passes the turn between sessions (turns.py)
    rounds: list[Round] = field(default_factory=list)
    calibrations: list[float] = field(default_factory=list)
    disturbed: int = 0

    def warmup(self) -> None:
        """Set the engine up for the whole trace (where it can: cache, CUDA graphs, kernel tuning), then one short
        replay (first requests, all at t=0), so one-time costs stay out of the samples."""
        if hasattr(self.engine, "prepare"):
            self.engine.prepare(self.trace)
        self.engine.run(self.trace.head(min(4, len(self.trace))))

    def _attempt(self) -> Round:
        if self.pin is not None:
            self.pin.mark()
        delay, cpu, start = run_delay_s(), cpu_seconds(), time.perf_counter()
        with MemoryWatcher(self.device) as watcher:
            result = self.engine.run(self.trace)
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        end_delay = run_delay_s()
        waited = None if delay is None or end_delay is None else end_delay - delay
        cache = getattr(self.engine, "cache", None)
        allocated = cache.allocated_bytes if cache is not None else None
        recall = cache.recall() if hasattr(cache, "recall") else None
        return Round(result, watcher.report, wall, cpu, waited, self.pin.cpu if self.pin else None, allocated, recall)

    def run_round(self) -> RunResult:
        """One timed round, measured again on a quieter CPU (up to MAX_ATTEMPTS) while other processes disturb it;
        on a machine with no quiet CPU left (pin.futile retries in a row) it is kept as it is."""
        turns.before_round(self.label, len(self.rounds))
        if self.calibrate is not None and not self.calibrations:
            self.calibrations.append(self.calibrate())
        measured = self._attempt()
        for _ in range(MAX_ATTEMPTS - 1):
            if not measured.disturbed or self.pin is None or self.pin.futile >= FUTILE_RETRIES:
                break
            self.disturbed += 1
            self.pin.move_away()
            measured = self._attempt()
            self.pin.futile = self.pin.futile + 1 if measured.disturbed else 0
        self.rounds.append(measured)
        if self.calibrate is not None:
            self.calibrations.append(self.calibrate())
        return measured.result

    def metrics(self) -> dict[str, list[float]]:
        """Every metric as samples, one per round."""
        per_round = [round_metrics(r, self.slo, self.device) for r in self.rounds]
        names = [n for n in dict.fromkeys(k for summary in per_round for k in summary)]
        return {n: [s[n] for s in per_round if n in s and s[n] is not None] for n in names}

    def info(self) -> dict:
        """What a reader needs to trust the samples: CPUs, disturbed rounds, calibration points, wait fractions."""
        return {
            "cpus": [r.cpu for r in self.rounds],
            "disturbed_rounds_repeated": self.disturbed,
            "still_disturbed": sum(r.disturbed for r in self.rounds),
            "run_delay_fraction": [None if r.run_delay_s is None else round(r.run_delay_s / r.wall_s, 4)
                                   for r in self.rounds],
            "calibration_points_s": [float(f"{c:.6g}") for c in self.calibrations],
        }

    def measurement(self, test_id: str, suite: str, config: dict, machine: dict) -> Measurement:
        calibration = median(self.calibrations) if self.calibrations else None
        return Measurement(test_id, suite, config, self.metrics(), calibration, machine, self.info())
