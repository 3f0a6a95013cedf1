"""paged strategy: block pool, block tables, admission by free blocks, preemption by recompute and by swap."""

import math

import pytest
import torch

from pytest_kvcache.engines.hf import HFEngine
from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.models import load_model
from pytest_kvcache.strategies import parse_strategy
from pytest_kvcache.strategies.paged import Paged, PagedCache
from pytest_kvcache.traces import Request, Trace

import cache_driver as drive


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")


def make_trace(prompts: list[int], outputs: list[int], seed: int = 0) -> Trace:
    """Requests all arriving at t=0 (a deterministic schedule), random prompt ids."""
    g = torch.Generator().manual_seed(seed)
    requests = [
        Request(f"r{i}", 0.0, tuple(torch.randint(4, 1024, (p,), generator=g).tolist()), o)
        for i, (p, o) in enumerate(zip(prompts, outputs))
    ]
    return Trace(tuple(requests))


def run(model, spec: str, trace: Trace):
    engine = HFEngine(model, parse_strategy(spec))
    result = engine.run(trace)
    return {r.id: r.output_ids for r in result.records}, result, engine.cache


@pytest.fixture(scope="module")
def trace():
    return make_trace([32, 40, 48, 56], [16, 16, 12, 12])


@pytest.fixture(scope="module")
def full_run(model, trace):
    return run(model, "full", trace)


def rope_by_hand(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama RoPE of x (H, L, D) at integer positions (L,), written out in plain torch."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rotated = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], -1)
    return x * cos + rotated * sin


def prefill_random(cache, row: int, tokens: int, arrival: float = 0.0, seed: int = 0) -> list:
    """Prefill `row` with random pre-RoPE k/v on every layer; returns each layer's (k, v), (1, Hkv, P, D)."""
    m, g = cache.model, torch.Generator().manual_seed(seed)
    cache.admit(row, Request(f"x{row}", arrival, tuple(range(4, 4 + tokens)), 8))
    kvs = []
    for layer in range(m.num_layers):
        q = torch.randn(1, m.config.num_attention_heads, tokens, m.head_dim, generator=g)
        k, v = (torch.randn(1, m.num_kv_heads, tokens, m.head_dim, generator=g) for _ in range(2))
        drive.prefill(cache, layer, row, q, k, v)
        kvs.append((k, v))
    cache.finish_prefill(row, tokens)
    return kvs


def row_kv(cache, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The row's blocks in table order: (layers, n_blocks, Hkv, block_size, D) for k and v."""
    ids = cache.block_table[row, : cache.row_blocks[row]]
    return cache.k[:, ids], cache.v[:, ids]


def test_ample_blocks_reproduce_full_bit_exactly(model, trace, full_run):
    full_tokens, full, _ = full_run
    for spec in ("paged", "paged:block_size=7"):
        tokens, result, cache = run(model, spec, trace)
        assert tokens == full_tokens, spec
        assert result.counters == full.counters, spec
        assert result.counters.preemptions == 0
        assert cache.used_blocks == 0
    assert len({tuple(t) for t in full_tokens.values()}) == len(trace), "degenerate model: every request same tokens"


def test_decode_attends_over_block_table_like_plain_attention(model):
    cache = Paged(block_size=4, blocks=10).make_cache(model, 2, 16)
    lengths = (6, 9)
    kvs = [prefill_random(cache, row, n, seed=row) for row, n in enumerate(lengths)]
    assert cache.row_blocks == [2, 3] and cache.used_blocks == 5
    g = torch.Generator().manual_seed(7)
    heads, hkv, dim = model.config.num_attention_heads, model.num_kv_heads, model.head_dim
    q = torch.randn(2, heads, 1, dim, generator=g)
    k, v = torch.randn(2, hkv, 1, dim, generator=g), torch.randn(2, hkv, 1, dim, generator=g)
    assert cache.reserve(0, 7) and cache.reserve(1, 10)
    cache.prepare(2)
    out = drive.decode(cache, 0, q, k, v, dim**-0.5)
    theta = model.config.rope_parameters["rope_theta"]
    for row, n in enumerate(lengths):
        keys = torch.cat([kvs[row][0][0][0], k[row]], 1)
        values = torch.cat([kvs[row][0][1][0], v[row]], 1)
        keys = rope_by_hand(keys, torch.arange(n + 1), theta).repeat_interleave(heads // hkv, 0)
        query = rope_by_hand(q[row], torch.tensor([n]), theta)
        weights = torch.softmax(query @ keys.transpose(1, 2) * dim**-0.5, -1)
        torch.testing.assert_close(out[row], weights @ values.repeat_interleave(heads // hkv, 0), atol=1e-5, rtol=1e-5)
        # keys are stored rotated once, at their own positions
        stored = row_kv(cache, row)[0][0].transpose(0, 1).reshape(hkv, -1, dim)[:, : n + 1]
        torch.testing.assert_close(stored, rope_by_hand(torch.cat([kvs[row][0][0][0], k[row]], 1),
                                                        torch.arange(n + 1), theta), atol=1e-5, rtol=1e-5)
    assert cache.row_blocks == [2, 3], "both rows still had room in their last block"


def test_swap_round_trip_is_bit_exact_and_counts_block_bytes(model):
    cache = Paged(block_size=8, blocks=12, preempt="swap").make_cache(model, 3, 40)
    prefill_random(cache, 0, 37, seed=1)
    prefill_random(cache, 1, 20, seed=2)
    before_k, before_v = row_kv(cache, 0)
    old_ids = cache.block_table[0, :5].tolist()
    resident = cache.counters.resident_bytes
    saved = cache.preempt(0)
    block_bytes = 2 * model.num_layers * model.num_kv_heads * 8 * model.head_dim * 4
    assert cache.counters.bytes_to_host == 5 * block_bytes
    assert cache.counters.resident_bytes == resident - 37 * model.kv_bytes_per_token
    assert torch.equal(saved.k, before_k) and torch.equal(saved.v, before_v)
    assert saved.k.device.type == "cpu" and saved.k.data_ptr() != cache.k.data_ptr()
    prefill_random(cache, 2, 12, seed=3)
    cache.resume(0, saved)
    assert cache.block_table[0, :5].tolist() != old_ids, "resume should land in other blocks"
    after_k, after_v = row_kv(cache, 0)
    assert torch.equal(after_k, before_k) and torch.equal(after_v, before_v)
    assert cache.counters.bytes_to_device == 5 * block_bytes
    assert cache.counters.resident_bytes == resident + 12 * model.kv_bytes_per_token
    assert (cache.kept[0], cache.seen[0]) == (37, 37)


def test_recompute_preemption_frees_blocks_and_returns_none(model):
    cache = Paged(block_size=8, blocks=12).make_cache(model, 2, 40)
    prefill_random(cache, 0, 37)
    assert cache.preempt(0) is None
    assert (cache.used_blocks, cache.counters.resident_bytes, cache.counters.bytes_to_host) == (0, 0, 0)


def staggered(prompts: list[int], outputs: list[int], arrivals: list[float]) -> Trace:
    """Requests with their own arrival times."""
    base = make_trace(prompts, outputs)
    return Trace(tuple(Request(r.id, a, r.prompt_ids, r.max_new_tokens) for r, a in zip(base.requests, arrivals)))


def test_running_requests_get_their_next_block_before_admission(model):
    """vLLM V1 order: r0 (32 prompt tokens = 2 of the 3 blocks) reserves its 3rd block for its next token before
    r1 (16 tokens, arriving while r0 decodes) is considered, so r1 waits instead of being admitted and preempted
    (admitting first then making room gave 1 preemption and a second prefill)."""
    trace = staggered([32, 16], [12, 8], [0.0, 0.003])
    tokens, result, cache = run(model, "paged:block_size=16,blocks=3", trace)
    r0, r1 = result.records
    assert result.counters.preemptions == 0
    assert r1.scheduled_s >= r0.token_times_s[-1], "r1 waits for r0's blocks"
    assert result.counters.tokens_stored == sum(r.context_tokens - 1 for r in trace.requests), "nothing recomputed"
    assert cache.peak_used_blocks == 3 and cache.peak_block_bytes == 3 * cache.block_bytes


def test_victim_is_the_tail_of_the_running_list(model, monkeypatch):
    """When a running request cannot grow, the latest admitted is preempted (V1 `self.running.pop()`)."""
    trace = make_trace([8, 8, 8], [40, 40, 40])  # three 1-block prompts in 8 blocks of 8: growing runs out
    engine = HFEngine(model, parse_strategy("paged:block_size=8,blocks=8"))
    victims, original = [], PagedCache.preempt

    def spy(cache, slot):
        victims.append(engine.slots[slot].request.id)
        return original(cache, slot)

    monkeypatch.setattr(PagedCache, "preempt", spy)
    result = engine.run(trace)
    assert victims[0] == "r2", victims
    assert result.counters.preemptions == len(victims) > 0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_keeps_greedy_tokens(model, trace, full_run, mode):
    full_tokens, full, _ = full_run
    tokens, result, cache = run(model, f"paged:block_size=8,blocks=16,preempt={mode}", trace)
    counters = result.counters
    assert counters.preemptions > 0
    assert tokens == full_tokens
    assert counters.tokens_kept_final == full.counters.tokens_kept_final
    assert cache.peak_used_blocks <= 16 and cache.used_blocks == 0
    if mode == "swap":
        assert counters.bytes_to_host == counters.bytes_to_device > 0
        assert counters.bytes_to_host % cache.block_bytes == 0
        assert counters.tokens_stored == full.counters.tokens_stored
    else:
        assert counters.bytes_to_host == counters.bytes_to_device == 0
        assert counters.tokens_stored > full.counters.tokens_stored, "recompute stores preempted tokens again"


def test_admission_waits_for_free_blocks(model):
    trace = make_trace([40, 40, 40], [8, 8, 8], seed=5)  # 40 + 8 tokens = 3 blocks of 16, prompt 3 blocks
    _, tight, cache = run(model, "paged:blocks=6", trace)
    r0, _, r2 = tight.records
    assert tight.counters.preemptions == 0 and cache.peak_used_blocks == 6
    assert r2.scheduled_s >= r0.token_times_s[-1], "third request needs blocks the first two hold"
    _, ample, _ = run(model, "paged:blocks=9", trace)
    r0, _, r2 = ample.records
    assert r2.scheduled_s < r0.token_times_s[1]


def test_watermark_keeps_blocks_free_at_admission(model):
    cache = Paged(block_size=16, blocks=10, watermark=0.2).make_cache(model, 3, 96)
    assert cache.watermark_blocks == 2
    assert cache.can_admit(0, 48) and not cache.can_admit(0, 129)
    prefill_random(cache, 0, 80)  # 5 blocks used, 5 free
    assert cache.can_admit(1, 48) and not cache.can_admit(1, 49)
    assert not cache.can_admit(3, 1), "every block-table row is taken"


@pytest.mark.parametrize(
    "spec, word",
    [
        ("paged:block_size=0", "block_size"),
        ("paged:block_size=2.5", "block_size"),
        ("paged:preempt=foo", "preempt"),
        ("paged:blocks=0", "blocks"),
        ("paged:watermark=1.0", "watermark"),
        ("paged:watermark=nan", "watermark"),
    ],
)
def test_bad_params_raise_one_line(spec, word):
    with pytest.raises(KVConfigError, match=word) as info:
        parse_strategy(spec)
    assert "\n" not in str(info.value)


def test_pool_too_small_for_longest_request_raises(model, trace):
    with pytest.raises(KVConfigError, match="blocks=3 cannot hold the longest request") as info:
        HFEngine(model, parse_strategy("paged:blocks=3")).run(trace)
    assert "\n" not in str(info.value)
    assert math.ceil(max(r.context_tokens for r in trace.requests) / 16) > 3
