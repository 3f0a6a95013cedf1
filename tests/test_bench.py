"""Bench: rounds of an engine turned into one sample per metric per round, checked with a scripted fake engine."""

import pytest

from pytest_kvcache import bench as bench_module
from pytest_kvcache.bench import Bench
from pytest_kvcache.metrics import KVCounters, RequestRecord, RunResult
from pytest_kvcache.traces import TraceSpec, synthetic


class ScriptedEngine:
    """Returns prepared results in order and remembers which traces it was asked to run."""

    def __init__(self, results, allocated=None):
        self.results = list(results)
        self.traces = []
        self.cache = None if allocated is None else type("Cache", (), {"allocated_bytes": allocated})()

    def run(self, trace):
        self.traces.append(trace)
        return self.results.pop(0)


def result(ttfts, evicted, duration=1.0, gaps=(0.01,)):
    """Requests arriving at 0 with first tokens at `ttfts` and then one token per gap."""
    records = []
    for i, t in enumerate(ttfts):
        times = [t]
        for gap in gaps:
            times.append(times[-1] + gap)
        records.append(RequestRecord(f"r{i}", 0.0, 4, list(range(len(times))), times))
    counters = KVCounters(tokens_stored=10, tokens_evicted=evicted, tokens_kept_final=10 - evicted,
                          peak_resident_bytes=100 * (10 - evicted))
    return RunResult(records, duration, counters)


class FakePin:
    """Stands in for machine.CpuPin: counts moves; a move goes to CPU 1."""

    cpu, moves, futile = 0, 0, 0

    def mark(self):
        pass

    def move_away(self):
        self.moves += 1
        self.cpu = 1


def test_warmup_replays_the_head_at_time_zero():
    """Warm-up runs at most four requests, all arriving at once, and is not a sample."""
    trace = synthetic(TraceSpec(num_requests=6, rate=2.0, prompt_len=4, output_len=2))
    engine = ScriptedEngine([result([0.1], 0)])
    bench = Bench(engine, trace)
    bench.warmup()
    assert len(engine.traces[0]) == 4
    assert {r.arrival_s for r in engine.traces[0].requests} == {0.0}
    assert bench.rounds == []


def test_each_round_is_one_sample_of_every_metric():
    """Round summaries, not pooled requests: medians and p90/p99 per round, rates and counters per round."""
    trace = synthetic(TraceSpec(num_requests=4, prompt_len=4, output_len=2))
    first = result([0.1, 0.2, 0.3, 0.4], 3)
    second = result([0.3, 0.4, 0.5, 0.6], 3, duration=2.0)
    engine = ScriptedEngine([first, second], allocated=4096)
    bench = Bench(engine, trace)
    bench.run_round()
    bench.run_round()
    m = bench.metrics()
    assert [round(x, 6) for x in m["ttft_ms"]] == [250.0, 450.0]
    assert [round(x, 6) for x in m["ttft_p90_ms"]] == [370.0, 570.0]
    assert [round(x, 6) for x in m["ttft_p99_ms"]] == [397.0, 597.0]
    assert [round(x, 6) for x in m["tpot_ms"]] == [10.0, 10.0]
    assert [round(x, 6) for x in m["itl_p99_ms"]] == [10.0, 10.0]
    assert [round(x, 6) for x in m["e2e_ms"]] == [260.0, 460.0]
    assert m["output_tokens"] == [8, 8]
    assert m["request_throughput"] == [4.0, 2.0]
    assert m["output_throughput"] == [8.0, 4.0]
    assert m["kv_tokens_evicted"] == [3, 3] and m["kv_tokens_kept"] == [7, 7] and m["kv_peak_bytes"] == [700, 700]
    assert m["kv_allocated_bytes"] == [4096, 4096]
    assert m["preemptions"] == [0, 0]
    assert len(m["cpu_ms_per_token"]) == 2 and all(x >= 0 for x in m["cpu_ms_per_token"])
    assert len(m["rss_growth_bytes"]) == 2
    assert "peak_device_bytes" not in m


def test_calibration_runs_before_the_first_round_and_after_each():
    """The measurement's calibration is the median of the points taken between rounds."""
    points = iter([0.004, 0.002, 0.003, 0.010])
    trace = synthetic(TraceSpec(num_requests=1, prompt_len=4, output_len=2))
    bench = Bench(ScriptedEngine([result([0.1], 0)] * 3), trace, calibrate=lambda: next(points))
    for _ in range(3):
        bench.run_round()
    measurement = bench.measurement("test_x[a]", "suite", {"k": 1}, {"machine_id": "m"})
    assert bench.calibrations == [0.004, 0.002, 0.003, 0.010]
    assert measurement.calibration_s == pytest.approx(0.0035)
    assert measurement.info["calibration_points_s"] == [0.004, 0.002, 0.003, 0.01]
    assert (measurement.test_id, measurement.suite, measurement.config) == ("test_x[a]", "suite", {"k": 1})


def test_disturbed_rounds_are_measured_again(monkeypatch):
    """A round during which the thread waited for a CPU most of the time is repeated (up to three tries) and
    counted; the pin is asked to move away from the busy CPU. Without a pin nothing is repeated."""
    delays = iter([0.0, 0.9, 0.9, 0.9])  # schedstat readings: attempt 1 waited 0.9 s (its wall: ms), attempt 2 none
    monkeypatch.setattr(bench_module, "run_delay_s", lambda: next(delays))

    pin = FakePin()
    trace = synthetic(TraceSpec(num_requests=1, prompt_len=4, output_len=2))
    bench = Bench(ScriptedEngine([result([0.1], 0), result([0.1], 0)]), trace, pin=pin)
    bench.run_round()
    assert (bench.disturbed, pin.moves, len(bench.rounds)) == (1, 1, 1)
    info = bench.info()
    assert info["cpus"] == [1] and info["still_disturbed"] == 0 and info["disturbed_rounds_repeated"] == 1


def test_retries_stop_when_no_cpu_is_quiet(monkeypatch):
    """Every attempt disturbed: after FUTILE_RETRIES retries in a row the rounds are kept as measured."""
    monkeypatch.setattr(bench_module, "run_delay_s", iter(float(i) for i in range(100)).__next__)

    pin = FakePin()
    trace = synthetic(TraceSpec(num_requests=1, prompt_len=4, output_len=2))
    bench = Bench(ScriptedEngine([result([0.1], 0)] * 10), trace, pin=pin)
    for _ in range(3):
        bench.run_round()
    assert (len(bench.rounds), pin.moves, pin.futile) == (3, bench_module.FUTILE_RETRIES, bench_module.FUTILE_RETRIES)
    assert bench.info()["still_disturbed"] == 3
