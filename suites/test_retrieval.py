"""Retrieval on real weights (SmolLM2-135M): the passkey task and RULER-style single needle, multi-key needle and
variable tracking, generated in code (pytest_kvcache/quality.py), 10 needles per prompt, each answer scored by
teacher-forced exact match after the strategy compressed the prompt. A task the full cache answers below the floor
at a length is reported as not discriminative there instead of gated. `make quality` runs the 1k prompts; 2k and
4k are marked `sweep` (about 15 more minutes on 2 CPU cores): `pytest suites/test_retrieval.py -m quality`."""

import pytest

LENGTHS = [
    pytest.param(1024, id="1k"),
    pytest.param(2048, id="2k", marks=pytest.mark.sweep),
    pytest.param(4096, id="4k", marks=pytest.mark.sweep),
]
STRATEGIES = ["full", "streaming:budget=0.5", "h2o:budget=0.5", "infinigen:budget=0.5"]


@pytest.mark.quality
@pytest.mark.kv_models("smollm2")
@pytest.mark.kv_strategies(*STRATEGIES)
@pytest.mark.parametrize("length", LENGTHS)
def test_retrieval(kv_retrieval, kv_model, kv_strategy, length):
    kv_retrieval(kv_model, kv_strategy, length)
