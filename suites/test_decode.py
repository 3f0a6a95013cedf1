"""Decode-heavy serving: 8 requests of 64 prompt tokens that arrive together and decode about 64 tokens each, so
the decode step is most of every round: the smoke selection's view of a change to the step (test_memory's 8 x
(384 -> 32) is mostly prefill, where a 10% slower step moved E2E by 3.9%)."""

import math

import pytest


@pytest.mark.kv_strategies("full", "streaming:budget=0.5", "h2o:budget=0.5", "paged")
@pytest.mark.kv_smoke("full", "streaming:budget=0.5", "h2o:budget=0.5")
def test_decode_heavy(kv_bench, kv_model, kv_strategy, request_trace):
    trace = request_trace(model=kv_model, rate=math.inf, num_requests=8, prompt_len=64, output_len=64, seed=5)
    measurement = kv_bench(trace, kv_model, kv_strategy)
    assert measurement.summary("output_tokens") == sum(r.max_new_tokens for r in trace.requests)
