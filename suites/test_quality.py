"""Output quality on real weights (SmolLM2-135M): greedy agreement with the full cache, perplexity ratio on a
fixed text, and passkey retrieval at depths 0.1/0.5/0.9 of a ~1k-token prompt, across KV budgets."""

import pytest

BUDGETS = [0.1, 0.2, 0.5, 1.0]
EVICTING = ["streaming", "h2o", "infinigen"]
STRATEGIES = [
    "full",
    *[f"{name}:budget={budget}" for name in EVICTING for budget in BUDGETS if name != "infinigen" or budget < 1],
    "quantized:bits=2",
    "quantized:bits=4",
    "paged",
]


@pytest.mark.quality
@pytest.mark.kv_models("smollm2")
@pytest.mark.kv_strategies(*STRATEGIES)
def test_quality(kv_quality, kv_model, kv_strategy):
    measurement = kv_quality(kv_model, kv_strategy)
    lossless = kv_strategy.name in ("full", "paged") or (
        kv_strategy.name in ("streaming", "h2o") and kv_strategy.budget == 1.0
    )
    if lossless:
        assert measurement.summary("token_agreement") == 1.0
