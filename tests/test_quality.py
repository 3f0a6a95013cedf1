"""quality.py on hand-made inputs: the metrics, the floor rule, and the retrieval generators."""

import math

import pytest
import torch

from pytest_kvcache import quality
from pytest_kvcache.errors import KVConfigError


def rows(*probabilities):
    return torch.tensor(probabilities, dtype=torch.float32).log()


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def text(ids) -> str:
    return "".join(map(chr, ids))


# ---------------------------------------------------------------- metrics

def test_kl_of_identical_distributions_is_zero():
    p = torch.log_softmax(torch.randn(5, 11), dim=-1)
    assert quality.kl_divergence(p, p) == 0.0


def test_kl_matches_the_formula_and_is_not_symmetric():
    p, q = rows([0.5, 0.5]), rows([0.9, 0.1])
    assert quality.kl_divergence(p, q) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert quality.kl_divergence(q, p) != pytest.approx(quality.kl_divergence(p, q))
    per_token = quality.token_kl(torch.cat([p, p]), torch.cat([p, q]))
    assert per_token[0] == 0 and per_token[1] > 0


def test_rows_of_different_shapes_are_refused():
    with pytest.raises(KVConfigError, match="same continuation"):
        quality.kl_divergence(rows([0.5, 0.5]), rows([0.5, 0.5], [0.5, 0.5]))


def test_top1_agreement_counts_equal_argmax_positions():
    reference = rows([0.7, 0.3], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9])
    candidate = rows([0.6, 0.4], [0.9, 0.1], [0.9, 0.1], [0.4, 0.6])
    assert quality.top1_agreement(reference, candidate) == 0.75


def test_first_divergence_is_the_first_differing_position():
    assert quality.first_divergence([5, 6, 7, 8], [5, 6, 9, 8]) == 2
    assert quality.first_divergence([1, 2], [3, 2]) == 0
    assert quality.first_divergence([5, 6, 7], [5, 6, 7]) == 3
    with pytest.raises(KVConfigError, match="same number of new tokens"):
        quality.first_divergence([1, 2], [1])


def test_perplexity_of_a_uniform_distribution_is_the_vocabulary_size():
    uniform = torch.full((3, 8), -math.log(8))
    assert quality.perplexity(uniform, [1, 2, 3]) == pytest.approx(8)
    with pytest.raises(KVConfigError, match="2 targets"):
        quality.perplexity(uniform, [1, 2])


def test_an_answer_is_correct_only_if_every_position_is_the_argmax():
    logprobs = rows([0.9, 0.1], [0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4])
    targets = [0, 1, 0, 0, 0]
    assert quality.answers_correct(logprobs, targets, [(1, 3), (2, 4), (4, 5)]) == [True, False, True]
    with pytest.raises(KVConfigError, match="full-attention prefill"):
        quality.answers_correct(logprobs, targets, [(0, 2)])


def test_floor_rule():
    assert quality.discriminative(0.5, floor=0.5)
    assert not quality.discriminative(0.4, floor=0.5)
    with pytest.raises(KVConfigError, match=r"\[0, 1\]"):
        quality.discriminative(0.5, floor=1.5)


# ---------------------------------------------------------------- shipped text

def test_text_windows_are_disjoint_and_spread_over_the_text():
    windows = quality.text_windows(list(range(100)), windows=3, length=20)
    assert [w[0] for w in windows] == [0, 40, 80] and all(len(w) == 20 for w in windows)
    with pytest.raises(KVConfigError, match="longer text"):
        quality.text_windows(list(range(100)), windows=3, length=40)


def test_the_evaluation_text_is_real_prose_and_not_the_warmup_text():
    evaluation = quality.evaluation_text()
    assert len(quality.sentences(evaluation)) > 300
    assert quality.data_text("warmup.txt")[:200] not in evaluation
    assert "Gutenberg" not in evaluation


# ---------------------------------------------------------------- retrieval cases

@pytest.mark.parametrize("task", sorted(quality.TASKS))
def test_cases_are_deterministic_per_seed(task):
    a = quality.retrieval_case(task, chars, 3000, samples=5, seed=1)
    assert a == quality.retrieval_case(task, chars, 3000, samples=5, seed=1)
    assert a != quality.retrieval_case(task, chars, 3000, samples=5, seed=2)


@pytest.mark.parametrize("task", sorted(quality.TASKS))
def test_each_needle_is_hidden_where_it_says_and_answered_by_its_span(task):
    case = quality.retrieval_case(task, chars, 6000, samples=10, seed=0, digits=5)
    prompt = text(case.prompt)
    assert 6000 - 100 < len(case.prompt) <= 6000
    assert len({n.key for n in case.needles}) == 10
    for needle, (start, end) in zip(case.needles, case.spans):
        first = prompt.index(needle.facts[0])
        assert abs(first / len(prompt) - needle.depth) < 0.05
        assert [prompt.index(f) for f in needle.facts] == sorted(prompt.index(f) for f in needle.facts)
        assert text(case.continuation[start:end]) == f" {needle.value}" and len(needle.value) == 5
        assert needle.key in text(case.continuation[:start]).rsplit("\n", 1)[-1]
        assert prompt.count(needle.facts[0]) == 1


def test_variable_tracking_passes_the_value_along_a_chain():
    needle = quality.retrieval_case("vartrack", chars, 3000, samples=3).needles[0]
    first, *hops = needle.facts
    assert first.endswith(f"= {needle.value}.") and len(hops) == quality.TASKS["vartrack"].hops
    assert hops[-1].startswith(f"VAR {needle.key} = VAR ")


def test_multikey_haystack_is_needles_with_other_keys():
    case = quality.retrieval_case("multikey", chars, 3000, samples=4)
    prompt = text(case.prompt)
    asked = {n.key for n in case.needles}
    mentioned = {line.split(" for ")[1].split(" is:")[0] for line in prompt.split(". ") if " for " in line}
    assert asked < mentioned and len(mentioned) > 3 * len(asked)


def test_a_prompt_too_short_for_its_needles_is_refused():
    with pytest.raises(KVConfigError, match="more than the 200 asked for"):
        quality.retrieval_case("passkey", chars, 200, samples=10)
    with pytest.raises(KVConfigError, match="unknown retrieval task 'haystack'"):
        quality.retrieval_case("haystack", chars, 1000)
