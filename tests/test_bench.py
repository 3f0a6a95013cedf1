"""Bench: rounds of an engine turned into per-metric samples, checked with a scripted fake engine."""

import torch

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


def result(ttfts, evicted, duration=1.0):
    records = [RequestRecord(f"r{i}", 0.0, 4, [1, 2], [t, t + 0.01]) for i, t in enumerate(ttfts)]
    counters = KVCounters(tokens_stored=10, tokens_evicted=evicted, tokens_kept_final=10 - evicted,
                          peak_resident_bytes=100 * (10 - evicted))
    return RunResult(records, duration, counters)


def test_warmup_replays_the_head_at_time_zero():
    """Warm-up runs at most four requests, all arriving at once, and is not a sample."""
    trace = synthetic(TraceSpec(num_requests=6, rate=2.0, prompt_len=4, output_len=2))
    engine = ScriptedEngine([result([0.1], 0)])
    bench = Bench(engine, trace, torch.device("cpu"))
    bench.warmup()
    assert len(engine.traces[0]) == 4
    assert {r.arrival_s for r in engine.traces[0].requests} == {0.0}
    assert bench.rounds == []


def test_latencies_pool_requests_and_counters_stay_per_round():
    """TTFT samples are every request of every round; exact counters are one value per round."""
    trace = synthetic(TraceSpec(num_requests=2, prompt_len=4, output_len=2))
    engine = ScriptedEngine([result([0.1, 0.2], 3), result([0.3, 0.4], 3, duration=2.0)], allocated=4096)
    bench = Bench(engine, trace, torch.device("cpu"))
    bench.run_round()
    bench.run_round()
    m = bench.metrics()
    assert [round(x, 6) for x in m["ttft_ms"]] == [100.0, 200.0, 300.0, 400.0]
    assert [round(x, 6) for x in m["tpot_ms"]] == [10.0] * 4
    assert m["output_tokens"] == [4, 4]
    assert m["request_throughput"] == [2.0, 1.0]
    assert m["kv_tokens_evicted"] == [3, 3]
    assert m["kv_tokens_stored"] == [10, 10]
    assert m["kv_tokens_kept"] == [7, 7]
    assert m["kv_peak_bytes"] == [700, 700]
    assert m["kv_allocated_bytes"] == [4096, 4096]
    assert m["preemptions"] == [0, 0]
    assert len(m["rss_growth_bytes"]) == 2
    assert "peak_device_bytes" not in m
    measurement = bench.measurement("test_x[a]", "suite", {"k": 1}, 0.5, {"machine_id": "m"})
    assert (measurement.test_id, measurement.suite, measurement.calibration_s) == ("test_x[a]", "suite", 0.5)
    assert measurement.summary("ttft_ms") == 250.0
