"""Throughput under a KV memory limit: smaller or cheaper KV admits more requests at once; paged preempts."""

import math

import pytest


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
