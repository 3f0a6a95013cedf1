"""Throughput under a KV memory limit: smaller or cheaper KV admits more requests at once; paged preempts."""

import math

import pytest

# A shared 2-core CPU moves millisecond timings of the tiny model by up to ~30% between quiet runs: time and rate
# metrics gate at 50% here (a 3x slower TTFT still fails); exact counters and memory keep their strict rules.
pytestmark = pytest.mark.kv_thresholds(ttft_ms=0.5, tpot_ms=0.5, itl_ms=0.5, e2e_ms=0.5, request_throughput=0.35,
                                       output_throughput=0.35, goodput=0.35)


FULL_REQUESTS_IN_LIMIT = 4
STRATEGIES = [
    "full",
    "streaming:budget=0.25",
    "streaming:budget=0.5",
    "h2o:budget=0.25",
    "h2o:budget=0.5",
    "infinigen:budget=0.25,track_recall=0",
    "quantized:bits=2",
    "quantized:bits=4",
    "paged",
    "paged:preempt=swap",
]


@pytest.mark.kv_strategies(*STRATEGIES)
def test_throughput_under_kv_limit(kv_bench, kv_model, kv_strategy, request_trace):
    trace = request_trace(model=kv_model, rate=math.inf, num_requests=24, prompt_len=256, output_len=48,
                          range_ratio=0.25, seed=2)
    limit = FULL_REQUESTS_IN_LIMIT * trace.max_context_tokens * kv_model.kv_bytes_per_token
    measurement = kv_bench(trace, kv_model, kv_strategy, kv_limit_bytes=limit)
    if kv_strategy.name != "infinigen":
        assert measurement.summary("kv_peak_bytes") <= limit
