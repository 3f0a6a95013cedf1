"""H2O: full-cache tokens at budget 1.0, the kept set against a plain-torch reference of the paper's rule, counters."""

import math

import pytest
import torch

from pytest_kvcache.engines.hf import HFEngine
from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.models import load_model
from pytest_kvcache.strategies import parse_strategy
from pytest_kvcache.strategies.base import rope
from pytest_kvcache.strategies.full import Full
from pytest_kvcache.strategies.h2o import H2O, keep_heavy_recent, prefill_scores
from pytest_kvcache.traces import Request, Trace

import cache_driver as drive

LENGTHS = [(40, 12), (64, 8), (96, 16), (33, 10)]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def trace() -> Trace:
    gen = torch.Generator().manual_seed(0)
    requests = tuple(
        Request(f"r{i}", 0.0, tuple(torch.randint(4, 1024, (prompt,), generator=gen).tolist()), new)
        for i, (prompt, new) in enumerate(LENGTHS)
    )
    return Trace(requests)


def outputs(result) -> dict[str, list[int]]:
    return {r.id: r.output_ids for r in result.records}


@pytest.fixture(scope="module")
def full_tokens(tiny, trace) -> dict[str, list[int]]:
    return outputs(HFEngine(tiny, Full()).run(trace))


def test_budget_one_reproduces_full(tiny, trace, full_tokens):
    result = HFEngine(tiny, H2O(budget=1.0)).run(trace)
    assert all(len(set(tokens)) > 5 for tokens in full_tokens.values()), "degenerate outputs make this vacuous"
    assert outputs(result) == full_tokens
    assert result.counters.tokens_evicted == 0


def test_small_budget_changes_tokens(tiny, trace, full_tokens):
    assert outputs(HFEngine(tiny, H2O(budget=8)).run(trace)) != full_tokens


def test_slot_moves_keep_each_request_intact(tiny, trace):
    """With 2 slots for 4 requests a finished request's slot is refilled by a move; tokens must not change."""
    strategy = H2O(budget=0.3, heavy_ratio=0.5)
    wide = outputs(HFEngine(tiny, strategy).run(trace))
    assert outputs(HFEngine(tiny, strategy, max_batch=2).run(trace)) == wide


def test_counters_exact(tiny, trace):
    engine = HFEngine(tiny, H2O(budget=0.25))
    counters = engine.run(trace).counters
    budgets = [math.ceil(0.25 * r.context_tokens) for r in trace.requests]
    stored = sum(r.context_tokens - 1 for r in trace.requests)
    assert all(b < len(r.prompt_ids) for b, r in zip(budgets, trace.requests))
    assert counters.tokens_stored == stored
    assert counters.tokens_kept_final == sum(budgets)
    assert counters.tokens_evicted == stored - sum(budgets)
    assert counters.resident_bytes == 0
    assert counters.peak_resident_bytes == sum(budgets) * tiny.kv_bytes_per_token
    assert engine.cache.slot_tokens == max(budgets) + 1
    per_cell = tiny.kv_bytes_per_token + tiny.num_layers * tiny.num_kv_heads * (4 + 8)  # K/V + f32 score + i64 pos
    assert engine.cache.allocated_bytes == len(trace) * (max(budgets) + 1) * per_cell


def reference_h2o(q, k, prompt, budget, heavy, scale):
    """The paper's rule, token by token on one request: q (Hq, T, D), k (Hkv, T, D) after RoPE.

    Returns the kept mask (Hkv, T) and accumulated scores (Hkv, T) after the last token."""
    q_heads, total, _ = q.shape
    kv_heads = k.shape[0]
    group = q_heads // kv_heads
    recent = budget - heavy
    kept = torch.zeros(kv_heads, total, dtype=torch.bool)
    score = torch.zeros(kv_heads, total)
    for h in range(kv_heads):
        heads = range(h * group, (h + 1) * group)
        for i in range(prompt):
            for j in heads:
                score[h, : i + 1] += torch.softmax(q[j, i] @ k[h, : i + 1].T * scale, -1)
        kept[h, :prompt] = True
        if prompt > budget:
            top = score[h, : prompt - recent].topk(heavy).indices
            kept[h, :prompt] = False
            kept[h, top] = True
            kept[h, prompt - recent : prompt] = True
        for t in range(prompt, total):
            kept[h, t] = True
            cached = kept[h].nonzero().squeeze(1)
            for j in heads:
                score[h, cached] += torch.softmax(q[j, t] @ k[h, cached].T * scale, -1)
            if len(cached) > budget:
                old = cached[cached < t + 1 - recent]
                kept[h, old[score[h, old].argmin()]] = False
    return kept, score


@pytest.mark.parametrize("heavy_ratio", [0.0, 0.6, 1.0])
def test_kept_set_matches_reference(tiny, heavy_ratio):
    """Two requests decoded as one batch (one starts over budget, one fills up) against the reference."""
    strategy = H2O(budget=10, heavy_ratio=heavy_ratio)
    heavy = strategy.split(Request("x", 0.0, (4,) * 20, 12))[0]
    cache = strategy.make_cache(tiny, 2, 11)
    gen = torch.Generator().manual_seed(1)
    q_heads, kv_heads, dim = tiny.config.num_attention_heads, tiny.num_kv_heads, tiny.head_dim
    scale, steps = dim**-0.5, 12
    prompts = [20, 7]
    data = []
    for slot, prompt in enumerate(prompts):
        total = prompt + steps
        q = torch.randn(1, q_heads, total, dim, generator=gen) * 2
        k = torch.randn(1, kv_heads, total, dim, generator=gen) * 2
        v = torch.randn(1, kv_heads, total, dim, generator=gen)
        cache.admit(slot, Request(f"r{slot}", 0.0, (4,) * prompt, steps + 1))
        drive.prefill(cache, 0, slot, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
        cache.finish_prefill(slot, prompt)
        data.append((q, k, v))
    for t in range(steps):
        cache.prepare(2)
        q, k, v = (torch.cat([d[i][:, :, p + t : p + t + 1] for d, p in zip(data, prompts)]) for i in range(3))
        drive.decode(cache, 0, q, k, v, scale)
        cache.advance(2)
    for slot, ((q, k, v), prompt) in enumerate(zip(data, prompts)):
        cos, sin = cache.angles(torch.arange(prompt + steps).unsqueeze(0))
        q_rot, k_rot = rope(q, cos, sin)[0], rope(k, cos, sin)[0]
        kept, score = reference_h2o(q_rot, k_rot, prompt, 10, heavy, scale)
        assert cache.kept[slot] == 10
        for h in range(kv_heads):
            positions = cache.pos[0, slot, h, :10].long()
            assert sorted(positions.tolist()) == kept[h].nonzero().squeeze(1).tolist()
            torch.testing.assert_close(cache.score[0, slot, h, :10], score[h, positions])
            torch.testing.assert_close(cache.k[0, slot, h, :10], k_rot[h, positions])
            torch.testing.assert_close(cache.v[0, slot, h, :10], v[0, h, positions])


def test_prefill_scores_chunked_equal_full_matrix():
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(4, 50, 16, generator=gen), torch.randn(2, 50, 16, generator=gen)
    logits = q @ k.repeat_interleave(2, 0).transpose(1, 2) * 0.25
    causal = torch.ones(50, 50, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, -math.inf).softmax(-1)
    expected = probs.sum(1).view(2, 2, 50).sum(1)
    torch.testing.assert_close(prefill_scores(q, k, 0.25, max_elements=4 * 50 * 7), expected)


def test_keep_heavy_recent_rule():
    scores = torch.tensor([[5.0, 1.0, 4.0, 0.0, 3.0, 2.0, 9.0], [0.0, 1.0, 2.0, 3.0, 4.0, 9.0, 0.0]])
    assert keep_heavy_recent(scores, 2, 2).tolist() == [[0, 2, 5, 6], [3, 4, 5, 6]]


def test_split_and_parse():
    strategy = parse_strategy("h2o:budget=0.5,heavy_ratio=0.3")
    request = Request("x", 0.0, (4,) * 30, 10)
    assert strategy.tokens(request) == 20
    assert strategy.split(request) == (6, 14)
    assert strategy.capacity(request) == 21
    assert H2O(budget=1.0).capacity(request) == 40


@pytest.mark.parametrize(
    "params",
    [{"budget": 1.5}, {"budget": 0}, {"budget": -3}, {"heavy_ratio": -0.1}, {"heavy_ratio": 1.5},
     {"heavy_ratio": float("nan")}, {"heavy_ratio": True}, {"heavy_ratio": "half"}],
)
def test_bad_params_raise_one_line(params):
    with pytest.raises(KVConfigError) as err:
        H2O(**params)
    message = str(err.value)
    assert "\n" not in message and next(iter(params)) in message


def test_bad_param_through_parse_strategy():
    with pytest.raises(KVConfigError, match="heavy_ratio must be a fraction of the budget in \\[0, 1\\], got 2"):
        parse_strategy("h2o:heavy_ratio=2")
