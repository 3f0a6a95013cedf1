"""The real vLLM engine through the same traces, metrics and baselines as the hf engine.

Tests are ordered by engine configuration (default, memory pressure, prefix caching): one engine runs at a time,
so each configuration starts once per session.
"""

import math

import pytest

# kv_cache_usage (peak fraction of the pool) depends on how many requests overlap, i.e. on timing.
pytestmark = pytest.mark.kv_thresholds(kv_cache_usage=0.5)

RATES = [8.0, 32.0]
PRESSURE_KV_BYTES = 3 * 2**20  # 12 blocks of 128 tokens on CPU (tiny model, fp32): 16 long requests must preempt


@pytest.mark.kv_strategies("vllm")
@pytest.mark.parametrize("rate", RATES, ids=[f"rate{r:g}" for r in RATES])
def test_vllm_latency(kv_bench, kv_model, kv_strategy, request_trace, rate):
    """Same trace shape as suites/test_latency.py, so vLLM and the hf strategies read side by side."""
    trace = request_trace(model=kv_model, rate=rate, num_requests=12, prompt_len=192, output_len=32,
                          range_ratio=0.25, seed=1)
    measurement = kv_bench(trace, kv_model, kv_strategy)
    assert measurement.summary("output_tokens") == sum(r.max_new_tokens for r in trace.requests)


@pytest.mark.kv_strategies("vllm", "full")
def test_engines_same_trace(kv_bench, kv_model, kv_strategy, request_trace):
    """vLLM and hf `full` on one burst trace: output tok/s of each engine, the same tokens per request."""
    trace = request_trace(model=kv_model, rate=math.inf, num_requests=16, prompt_len=128, output_len=64, seed=6)
    measurement = kv_bench(trace, kv_model, kv_strategy)
    assert measurement.summary("output_tokens") == 16 * 64


@pytest.mark.kv_strategies(f"vllm:kv_cache_memory_bytes={PRESSURE_KV_BYTES}")
def test_vllm_memory_pressure(kv_bench, kv_model, kv_strategy, request_trace):
    """A KV pool too small for the burst: vLLM must preempt (V1: by recompute) and still finish every request."""
    trace = request_trace(model=kv_model, rate=math.inf, num_requests=16, prompt_len=128, output_len=256, seed=4)
    measurement = kv_bench(trace, kv_model, kv_strategy)
    assert measurement.summary("preemptions") > 0
    assert measurement.summary("kv_cache_usage") > 0.9
    assert measurement.summary("output_tokens") == sum(r.max_new_tokens for r in trace.requests)


@pytest.mark.kv_strategies("vllm-prefix")
def test_vllm_prefix_caching(kv_bench, kv_model, kv_strategy, request_trace):
    """Prompts sharing a 256-token prefix (two 128-token CPU blocks): every request after the first hits it.
    Each replay starts from a cold prefix cache, so the rate is 7 of 8 requests x 256 of 320 prompt tokens."""
    trace = request_trace(model=kv_model, rate=4.0, num_requests=8, prompt_len=320, output_len=16,
                          shared_prefix_len=256, seed=5)
    measurement = kv_bench(trace, kv_model, kv_strategy)
    assert measurement.summary("prefix_cache_hit_rate") == pytest.approx(7 * 256 / (8 * 320))


@pytest.mark.gpu
@pytest.mark.kv_strategies("vllm-offload")
def test_vllm_offload(kv_bench, kv_model, kv_strategy, request_trace):
    """vLLM's KV offloading to host memory (GPU only)."""
    trace = request_trace(model=kv_model, rate=math.inf, num_requests=16, prompt_len=512, output_len=64, seed=7)
    kv_bench(trace, kv_model, kv_strategy)
