"""The quality fixtures' measurements on the tiny model with a character tokenizer: a strategy whose budget holds
every token scores exactly like the full cache, and the metrics the gate knows are the ones recorded."""

from types import SimpleNamespace

import pytest

from pytest_kvcache.metrics import METRICS
from pytest_kvcache.models import load_model
from pytest_kvcache.quality_fixture import QualityRun, RetrievalSetup, TextSetup, retrieval_result, text_result

TEXT = TextSetup(windows=2, prefill=48, continuation=12, greedy=4)
RETRIEVAL = RetrievalSetup(tasks=("passkey", "vartrack"), samples=2, digits=3, floor=0.0)


class CharTokenizer:
    """One token per character, folded into the tiny model's vocabulary."""

    def __call__(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[ord(c) % 1024 for c in text])


@pytest.fixture(scope="module")
def run():
    tiny = load_model("tiny")
    tiny.tokenizer = CharTokenizer()
    return QualityRun(tiny)


@pytest.mark.parametrize("strategy", ["full", "h2o:budget=1.0", "streaming:budget=1.0"])
def test_budget_that_holds_everything_scores_like_full(run, strategy):
    config, metrics, _ = text_result(run, strategy, TEXT)
    assert metrics["kl_divergence"] == [0.0]
    assert metrics["top1_agreement"] == [1.0]
    assert metrics["perplexity_ratio"] == [1.0]
    assert metrics["first_divergence"] == [TEXT.greedy]
    assert config["prefill_compression"] == 1.0
    assert set(metrics) <= set(METRICS)


def test_an_evicting_budget_moves_the_distribution(run):
    config, metrics, info = text_result(run, "streaming:budget=0.2", TEXT)
    assert metrics["kl_divergence"][0] > 0
    assert config["prefill_kept"] == 12  # ceil(0.2 * (48 + 12))
    assert len(info["per_window"]) == TEXT.windows


def test_retrieval_of_a_lossless_budget_equals_full(run):
    _, full_metrics, full_info = retrieval_result(run, "full", 400, RETRIEVAL)
    _, metrics, info = retrieval_result(run, "h2o:budget=1.0", 400, RETRIEVAL)
    assert metrics == full_metrics
    assert set(metrics) == {"passkey_accuracy", "vartrack_accuracy"} <= set(METRICS)
    assert [t["correct"] for t in info["tasks"].values()] == [t["correct"] for t in full_info["tasks"].values()]


def test_a_cell_below_the_floor_is_reported_not_gated(run):
    strict = RetrievalSetup(tasks=("passkey",), samples=2, digits=3, floor=1.0)
    _, metrics, info = retrieval_result(run, "streaming:budget=0.5", 400, strict)
    task = info["tasks"]["passkey"]
    assert not task["discriminative"] and task["accuracy"] is None
    assert metrics == {}
