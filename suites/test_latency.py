"""Latency (TTFT, TPOT, ITL, E2E) of each strategy at a light and a heavy Poisson request rate."""

import pytest

RATES = [4.0, 16.0]
TRACE = {
    "tiny": dict(num_requests=16, prompt_len=192, output_len=32),
    "smollm2": dict(num_requests=6, prompt_len=128, output_len=16),
}


@pytest.mark.kv_models("tiny", "smollm2")
@pytest.mark.kv_strategies("full", "streaming:budget=0.5")
@pytest.mark.parametrize("rate", RATES, ids=[f"rate{r:g}" for r in RATES])
def test_latency(kv_bench, kv_model, kv_strategy, request_trace, rate):
    shape = TRACE.get(kv_model.name, TRACE["tiny"])
    trace = request_trace(model=kv_model, rate=rate, range_ratio=0.25, seed=1, **shape)
    measurement = kv_bench(trace, kv_model, kv_strategy)
    assert measurement.summary("output_tokens") == sum(r.max_new_tokens for r in trace.requests)
