"""Decode-heavy serving: 8 requests of 64 prompt tokens that arrive together and decode about 64 tokens each, so
the decode step is most of every round. Its three smoke strategies are the whole smoke selection that `kvbench
compare` runs on pull requests: a pair of sessions of them (10 interleaved rounds each) takes about 17 s on 2 cores
beside a busy process, so a compare of 12-28 pairs takes 3-10 minutes (benchmarks/results/gate-smoke-pooled-28.md).
test_memory's 8 x (384 -> 32), the earlier smoke selection, is mostly prefill: a 10% slower step moved its E2E by
3.9%, and a pair of its 8 tests took 74 s (benchmarks/results/gate-10rounds.md)."""

import math

import pytest


@pytest.mark.kv_strategies("full", "streaming:budget=0.5", "h2o:budget=0.5", "paged")
@pytest.mark.kv_smoke("full", "streaming:budget=0.5", "h2o:budget=0.5")
def test_decode_heavy(kv_bench, kv_model, kv_strategy, request_trace):
    trace = request_trace(model=kv_model, rate=math.inf, num_requests=8, prompt_len=64, output_len=64, seed=5)
    measurement = kv_bench(trace, kv_model, kv_strategy)
    assert measurement.summary("output_tokens") == sum(r.max_new_tokens for r in trace.requests)
