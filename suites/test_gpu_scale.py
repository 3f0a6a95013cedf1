"""The 8B shape where its figures matter (GPU only): 32 requests at a long context, the full cache against a 20%
KV budget, so the suite gates what eviction buys on the hardware (decode step time and its roofline fraction)."""

import math

import pytest


@pytest.mark.gpu
@pytest.mark.kv_models("llama-8b")
@pytest.mark.kv_strategies("full", "streaming:budget=0.2", "h2o:budget=0.2")
def test_decode_at_scale(kv_bench, kv_model, kv_strategy, request_trace):
    trace = request_trace(model=kv_model, rate=math.inf, num_requests=32, prompt_len=4096, output_len=64, seed=8)
    measurement = kv_bench(trace, kv_model, kv_strategy)
    assert measurement.summary("output_tokens") == 32 * 64
    assert measurement.summary("roofline_fraction") > 0
