"""InfiniGen on the tiny model: skewing, exact fetch counters, recall, and bit-identity with `full` when
speculation selects everything. References are plain torch written here."""

import math
from dataclasses import replace
from importlib.resources import files
from types import SimpleNamespace

import pytest
import torch

from pytest_kvcache.engines.hf import HFEngine
from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.models import load_model
from pytest_kvcache.strategies import infinigen, parse_strategy
from pytest_kvcache.strategies.base import rope
from pytest_kvcache.traces import Request, Trace

SELECT_ALL = "infinigen:fetch_all=1"


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def trace(tiny):
    """Three requests at t=0 of different lengths, so slots retire and move mid-run."""
    g = torch.Generator().manual_seed(11)
    shapes = [(40, 8), (64, 12), (80, 16)]
    return Trace(tuple(
        Request(f"r{i}", 0.0, tuple(torch.randint(tiny.vocab_size, (p,), generator=g).tolist()), n)
        for i, (p, n) in enumerate(shapes)
    ))


@pytest.fixture(scope="module")
def full_tokens(tiny, trace):
    return tokens(HFEngine(tiny, parse_strategy("full")).run(trace))


def tokens(result):
    return {r.id: r.output_ids for r in result.records}


def skewed_layer_qk(tiny, hidden, layer=2):
    """Rotated q (Hq, P, D) and k (Hkv, P, D) of one real layer for hidden states (P, hidden)."""
    attn, norm = tiny.model.model.layers[layer].self_attn, tiny.model.model.layers[layer].input_layernorm
    length, dim = hidden.shape[0], tiny.head_dim
    with torch.no_grad():
        h = norm(hidden)
        q = attn.q_proj(h).view(length, -1, dim).transpose(0, 1)[None]
        k = attn.k_proj(h).view(length, -1, dim).transpose(0, 1)[None]
        cos, sin = tiny.model.model.rotary_emb(q, torch.arange(length)[None])
    return q[0], k[0], rope(q, cos, sin)[0], rope(k, cos, sin)[0]


def top_share(q, columns):
    """Share of sum |q| (per KV group: q (Hkv, N, D)) held by its `columns` largest columns."""
    mass = q.abs().sum(dim=1)
    return (mass.topk(columns, dim=-1).values.sum(-1) / mass.sum(-1)).min().item()


def test_skewing_keeps_qk_and_concentrates_columns(tiny):
    """A is orthogonal, so (QA)(KA)^T = QK^T; after skewing a few columns carry more of |Q| than before."""
    g = torch.Generator().manual_seed(3)
    dim, groups = tiny.head_dim, tiny.config.num_attention_heads // tiny.num_kv_heads
    columns = int(dim * 0.2)
    hidden = tiny.model.model.embed_tokens(torch.randint(tiny.vocab_size, (256,), generator=g)).detach()
    _, _, q_rot, k_rot = skewed_layer_qk(tiny, hidden)
    skew = infinigen.skewing_matrices(q_rot, k_rot)
    eye = torch.eye(dim).expand_as(skew)
    assert torch.allclose(skew.mT @ skew, eye, atol=1e-5)
    for head in range(q_rot.shape[0]):
        a = skew[head // groups]
        exact = q_rot[head] @ k_rot[head // groups].T
        assert torch.allclose((q_rot[head] @ a) @ (k_rot[head // groups] @ a).T, exact, atol=1e-4 * exact.abs().max())
    grouped = q_rot.reshape(tiny.num_kv_heads, -1, dim)
    before, after = top_share(grouped, columns), top_share(grouped @ skew, columns)
    assert after > before + 0.02, (before, after)
    # Low-rank queries (as in trained models): pre-RoPE (OPT-like) the top 20% of columns then hold most of |Q|;
    # RoPE spreads it (why skewing helps Llama less), but skewing still beats the raw columns.
    low_rank = torch.randn(256, 4, generator=g) @ torch.randn(4, hidden.shape[1], generator=g)
    q, k, q_rot, k_rot = skewed_layer_qk(tiny, low_rank)
    plain = q.reshape(tiny.num_kv_heads, -1, dim)
    assert top_share(plain, columns) < 0.35 < 0.8 < top_share(plain @ infinigen.skewing_matrices(q, k), columns)
    rotated = q_rot.reshape(tiny.num_kv_heads, -1, dim)
    assert top_share(rotated @ infinigen.skewing_matrices(q_rot, k_rot), columns) > top_share(rotated, columns) + 0.05


def test_select_everything_reproduces_full(tiny, trace, full_tokens):
    """alpha huge and budget 1.0 fetch every token in position order: bit-identical greedy tokens (and teacher-forced
    log-probabilities) to `full`; the warm-up's skewing matrices are orthogonal; a 4-token budget changes tokens."""
    assert all(len(set(ids)) > 3 for ids in full_tokens.values()), "degenerate outputs make this vacuous"
    engine = HFEngine(tiny, parse_strategy(SELECT_ALL))
    assert tokens(engine.run(trace)) == full_tokens
    skew = engine.cache.skew.float()
    assert skew.shape == (tiny.num_layers, tiny.num_kv_heads, tiny.head_dim, tiny.head_dim)
    assert torch.allclose(skew.mT @ skew, torch.eye(tiny.head_dim).expand_as(skew), atol=1e-5)
    assert tokens(HFEngine(tiny, parse_strategy("infinigen:budget=4")).run(trace)) != full_tokens
    prompt = list(trace.requests[0].prompt_ids)
    scored = [HFEngine(tiny, parse_strategy(spec)).score(prompt, 24) for spec in ("full", SELECT_ALL)]
    assert scored[0] == scored[1]


def test_partial_columns_are_the_union_of_query_and_key_tops():
    """The reference's Llama rule: per head the top-n columns by summed |QA| and by summed |KA|, united; fixed-width
    index with a validity mask (columns past the union pad and are masked)."""
    q_mass = torch.tensor([[9.0, 8.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 5.0, 6.0, 0.0, 0.0]])
    k_mass = torch.tensor([[9.0, 0.0, 0.0, 0.0, 7.0, 0.0], [0.0, 0.0, 5.0, 6.0, 1.0, 0.0]])
    index, valid = infinigen.partial_columns(q_mass, k_mass, 2, 4)
    assert index.tolist()[0][:3] == [0, 1, 4] and valid.tolist()[0] == [True, True, True, False]
    assert index.tolist()[1][:2] == [2, 3] and valid.tolist()[1] == [True, True, False, False]


def test_select_tokens_rule():
    """Per head count logits > max - alpha, average over heads, cap; top-n per head in position order."""
    scores = torch.tensor([[[0.0, 4.5, 5.0, -1.0, -math.inf], [3.0, 0.0, 0.5, 2.9, -math.inf]]])
    chosen, count = infinigen.select_tokens(scores, 1.0, torch.tensor([10]))
    assert count.tolist() == [2] and chosen.tolist() == [[[1, 2], [0, 3]]]
    chosen, count = infinigen.select_tokens(scores, 1.0, torch.tensor([1]))
    assert count.tolist() == [1] and chosen.tolist() == [[[2], [0]]]
    chosen, count = infinigen.select_tokens(scores, 100.0, torch.tensor([10]))
    assert count.tolist() == [4] and chosen.tolist() == [[[0, 1, 2, 3], [0, 1, 2, 3]]]


@pytest.mark.parametrize("budget", ["6", "0.25"])
def test_bytes_moved_are_the_selected_tokens(tiny, trace, monkeypatch, budget):
    """bytes_to_device = rows chosen (counted from each selection) x K+V row bytes; dense layers fetch every
    cached token; bytes_to_host = every stored token's K/V in all layers."""
    rows = {"dense": 0, "sparse": 0}
    original = infinigen.InfiniGenCache._fetch

    def spy(self, layer, chosen, count, keys, values):
        batch = chosen.shape[0]
        kept, caps = torch.tensor(self.kept[:batch]), torch.tensor(self.limit[:batch]) - 1
        valid = chosen < max(self.kept[:batch])  # padding is the step's span
        per_head = valid.sum(-1)
        assert (per_head == per_head[:, :1]).all() and (chosen < torch.where(valid, kept[:, None, None], 10**9)).all()
        if layer < 2:
            assert per_head[:, 0].tolist() == self.kept[:batch]
        else:
            assert (per_head[:, 0] >= 1).all() and (per_head[:, 0] <= caps).all()
        rows["dense" if layer < 2 else "sparse"] += int(valid.sum())
        return original(self, layer, chosen, count, keys, values)

    monkeypatch.setattr(infinigen.InfiniGenCache, "_fetch", spy)
    counters = HFEngine(tiny, parse_strategy(f"infinigen:budget={budget}")).run(trace).counters
    heads, row_bytes = tiny.num_kv_heads, 2 * tiny.head_dim * torch.finfo(tiny.dtype).bits // 8
    cached = sum(len(r.prompt_ids) + step for r in trace.requests for step in range(r.max_new_tokens - 1))
    assert rows["dense"] == 2 * cached * heads
    assert 0 < rows["sparse"] < (tiny.num_layers - 2) * cached * heads
    assert counters.bytes_to_device == (rows["dense"] + rows["sparse"]) * row_bytes
    assert counters.tokens_stored == sum(r.context_tokens - 1 for r in trace.requests)
    assert counters.bytes_to_host == counters.tokens_stored * tiny.kv_bytes_per_token
    assert counters.tokens_evicted == 0 and counters.tokens_kept_final == counters.tokens_stored


def test_recall(tiny, trace, monkeypatch):
    """Recall is 1 when everything is fetched, in [0, 1) under a small budget; nan for dense layers. Speculating
    from a layer's own input with all columns gives the real logits, so its recall is 1: the speculation path
    (RoPE, skew, partial keys) agrees with the real attention."""
    engine = HFEngine(tiny, parse_strategy(SELECT_ALL))
    engine.run(trace)
    assert engine.cache.recall() == 1.0
    assert math.isnan(engine.cache.recall(0))
    engine = HFEngine(tiny, parse_strategy("infinigen:budget=0.25"))
    engine.run(trace)
    assert 0.0 <= engine.cache.recall() < 1.0

    def own_layer(self, layer, hidden, step):
        if layer >= self.dense:
            self.fetched[layer] = self._speculate(layer, hidden, step)

    monkeypatch.setattr(infinigen.InfiniGenCache, "before_attention", own_layer)
    engine = HFEngine(tiny, parse_strategy("infinigen:budget=0.25,partial_ratio=1.0"))
    engine.run(trace)
    assert engine.cache.recall() >= 0.995


@pytest.mark.parametrize("spec", [
    "infinigen:alpha=0", "infinigen:alpha=-1", "infinigen:alpha=inf", "infinigen:partial_ratio=0",
    "infinigen:partial_ratio=1.5", "infinigen:budget=1.5", "infinigen:budget=0", "infinigen:track_recall=2",
    "infinigen:budget=1.0", "infinigen:fetch_all=2",
])
def test_bad_parameters(spec):
    with pytest.raises(KVConfigError) as info:
        parse_strategy(spec)
    message = str(info.value)
    assert "\n" not in message and spec.split(":")[1].split("=")[0] in message
    if spec == "infinigen:budget=1.0":
        assert "infinigen:fetch_all=1" in message, "the refusal names the mode that fetches everything"


def test_warm_up_text_is_real_prose_for_real_models(tiny):
    """Random-weight models warm up on seeded ids; a model with a tokenizer reads the shipped warm-up text."""
    length = min(infinigen.WARMUP_TOKENS, tiny.config.max_position_embeddings)
    assert infinigen.warmup_ids(tiny) == infinigen.warmup_ids(tiny) and len(infinigen.warmup_ids(tiny)) == length

    class Tokenizer:
        def __call__(self, text):
            return SimpleNamespace(input_ids=[len(word) for word in text.split()])

    real = replace(tiny, tokenizer=Tokenizer())
    text = (files("pytest_kvcache") / infinigen.WARMUP_TEXT).read_text()
    assert infinigen.warmup_ids(real) == [len(word) for word in text.split()][:length]
