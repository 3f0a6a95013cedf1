"""Output quality on real weights (SmolLM2-135M) against the full cache, every metric on the same continuation:
teacher-forced top-1 agreement, mean per-token KL(full || strategy) and the perplexity ratio over two windows of
pytest_kvcache/data/evaluation.txt (1024 prompt tokens, then 64 scored), plus where the free-running greedy
continuation first differs. Budgets are fractions of each request (1088 tokens), so each one cuts the prefill:
the kept share is in the results (prefill_compression)."""

import pytest

BUDGETS = [0.1, 0.2, 0.5]
EVICTING = ["streaming", "h2o", "infinigen"]
STRATEGIES = [
    "full",
    *[f"{name}:budget={budget}" for name in EVICTING for budget in BUDGETS if name != "infinigen" or budget < 1],
    "quantized:bits=2",
    "quantized:bits=4",
]


@pytest.mark.quality
@pytest.mark.kv_models("smollm2")
@pytest.mark.kv_strategies(*STRATEGIES)
def test_quality(kv_quality, kv_model, kv_strategy):
    measurement = kv_quality(kv_model, kv_strategy)
    if kv_strategy.name == "full":
        assert measurement.summary("kl_divergence") == 0.0
        assert measurement.summary("top1_agreement") == 1.0
