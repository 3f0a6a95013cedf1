"""Throughput under a KV memory limit: a smaller KV budget admits more requests at once."""

import math

import pytest

FULL_REQUESTS_IN_LIMIT = 4


@pytest.mark.kv_strategies("full", "streaming:budget=0.25", "streaming:budget=0.5")
def test_throughput_under_kv_limit(kv_bench, kv_model, kv_strategy, request_trace):
    trace = request_trace(model=kv_model, rate=math.inf, num_requests=24, prompt_len=256, output_len=48, seed=2)
    limit = FULL_REQUESTS_IN_LIMIT * trace.max_context_tokens * kv_model.kv_bytes_per_token
    measurement = kv_bench(trace, kv_model, kv_strategy, kv_limit_bytes=limit)
    assert measurement.summary("kv_peak_bytes") <= limit
