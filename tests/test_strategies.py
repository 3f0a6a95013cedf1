"""KV strategies on the tiny model, checked against plain-torch references written here."""

import math

import pytest
import torch

from pytest_kvcache.engines.hf import HFEngine
from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.models import load_model
from pytest_kvcache.strategies import STRATEGIES, parse_strategy
from pytest_kvcache.traces import Request, TraceSpec, synthetic


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def make_trace(tiny, num_requests=4, prompt_len=48, output_len=12, range_ratio=0.25, seed=5):
    return synthetic(TraceSpec(num_requests=num_requests, rate=math.inf, prompt_len=prompt_len, output_len=output_len,
                               range_ratio=range_ratio, vocab_size=tiny.vocab_size, seed=seed))


def run(tiny, spec, trace):
    engine = HFEngine(tiny, parse_strategy(spec))
    result = engine.run(trace)
    return engine, result, {r.id: r.output_ids for r in result.records}


# ---------------------------------------------------------------- plain-torch reference

def rope_theta(config):
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", 10000.0))


def rotate(x, positions, theta):
    """Llama RoPE (rotate-half convention) of x (..., L, D) at integer positions (L,)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    half = dim // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * angles.cos() + rotated_half * angles.sin()


@torch.no_grad()
def streaming_reference(tiny, prompt, max_new_tokens, budget, sinks, rerotate=True):
    """StreamingLLM greedy decoding, one request, written out layer by layer.

    Prefill: full causal attention over the prompt, then keep the first `sinks` and the last `budget - sinks`
    tokens. Each decode step appends the new token's pre-RoPE K/V, drops the oldest non-sink token once more
    than `budget` are held, rotates the held keys to their positions *inside the cache* (0..n-1) and puts the
    query at n-1. With rerotate=False keys keep their original positions (what ports without re-rotation do).
    """
    hf = tiny.model
    cfg = hf.config
    heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, tiny.head_dim
    theta = rope_theta(cfg)
    layers = hf.model.layers
    held = [None] * len(layers)  # per layer: (k, v, original positions), k/v (kv_heads, n, dim) pre-RoPE

    def forward(ids, positions, prefill):
        x = hf.model.embed_tokens(torch.tensor(ids))
        n = len(ids)
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(n, heads, dim).transpose(0, 1)
            k = attn.k_proj(h).view(n, kv_heads, dim).transpose(0, 1)
            v = attn.v_proj(h).view(n, kv_heads, dim).transpose(0, 1)
            if prefill:
                keys, values, orig = k, v, positions
            else:
                keys, values = torch.cat([held[i][0], k], 1), torch.cat([held[i][1], v], 1)
                orig = torch.cat([held[i][2], positions])
                if keys.shape[1] > budget:
                    drop = [j for j in range(keys.shape[1]) if j != sinks]
                    keys, values, orig = keys[:, drop], values[:, drop], orig[drop]
            held[i] = (keys, values, orig)
            if prefill or not rerotate:
                key_pos, query_pos = orig, positions
            else:
                key_pos = torch.arange(keys.shape[1])
                query_pos = key_pos[-1:]
            group = heads // kv_heads
            k_rot = rotate(keys, key_pos, theta).repeat_interleave(group, 0)
            scores = rotate(q, query_pos, theta) @ k_rot.transpose(1, 2) / math.sqrt(dim)
            if prefill:
                scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
            out = scores.softmax(-1) @ values.repeat_interleave(group, 0)
            x = x + attn.o_proj(out.transpose(0, 1).reshape(n, heads * dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return int(hf.lm_head(hf.model.norm(x[-1])).argmax())

    tokens = [forward(list(prompt), torch.arange(len(prompt)), prefill=True)]
    for i, (k, v, orig) in enumerate(held):
        if k.shape[1] > budget:
            keep = list(range(sinks)) + list(range(k.shape[1] - (budget - sinks), k.shape[1]))
            held[i] = (k[:, keep], v[:, keep], orig[keep])
    while len(tokens) < max_new_tokens:
        position = len(prompt) + len(tokens) - 1
        tokens.append(forward([tokens[-1]], torch.tensor([position]), prefill=False))
    return tokens


def kept_positions(stored, capacity, sinks):
    """Positions StreamingLLM holds after `stored` tokens went through a cache of `capacity` tokens."""
    if stored <= capacity:
        return list(range(stored))
    return list(range(sinks)) + list(range(stored - (capacity - sinks), stored))


@torch.no_grad()
def layer0_kv(tiny, ids):
    """Pre-RoPE layer-0 K and V of a token sequence (kv_heads, len, head_dim): they depend on the token alone."""
    layer = tiny.model.model.layers[0]
    h = layer.input_layernorm(tiny.model.model.embed_tokens(torch.tensor(ids)))
    shape = (len(ids), tiny.num_kv_heads, tiny.head_dim)
    return layer.self_attn.k_proj(h).view(shape).transpose(0, 1), layer.self_attn.v_proj(h).view(shape).transpose(0, 1)


def match_rows(actual, expected):
    """Match each expected row to a distinct, numerically equal actual row (order-free; duplicates allowed)."""
    unused = list(range(actual.shape[0]))
    for row in expected:
        distances = torch.stack([(actual[j] - row).abs().max() for j in unused])
        best = int(distances.argmin())
        assert float(distances[best]) < 1e-4, f"no stored row matches (closest differs by {float(distances[best])})"
        unused.pop(best)
    assert unused == [], f"{len(unused)} stored rows match no kept position"


# ---------------------------------------------------------------- parsing

def test_parse_full_and_streaming():
    """Spec strings map to configured strategies and back to the same label."""
    assert parse_strategy("full").label() == "full"
    s = parse_strategy("streaming:budget=0.2,sinks=2")
    assert (s.name, s.budget, s.sinks) == ("streaming", 0.2, 2)
    assert s.label() == "streaming:budget=0.2,sinks=2"
    assert parse_strategy(s.label()) == s
    default = parse_strategy("streaming")
    assert (default.budget, default.sinks) == (0.5, 4)
    assert parse_strategy(default.label()) == default
    assert parse_strategy("streaming:budget=24").budget == 24


@pytest.mark.parametrize("spec,words", [
    ("nosuch", "unknown strategy 'nosuch': choose one of"),
    ("streaming:nosuchparam=1", "strategy 'streaming' has no parameter 'nosuchparam'; it takes: budget, sinks"),
    ("streaming:budget", "expected key=value, got 'budget'"),
    ("streaming:budget=0", "budget must be a fraction in (0, 1]"),
    ("streaming:budget=1.5", "budget must be a fraction in (0, 1]"),
    ("streaming:budget=-1", "budget must be a fraction in (0, 1]"),
    ("streaming:budget=abc", "budget must be a fraction in (0, 1]"),
    ("streaming:budget=nan", "budget must be a fraction in (0, 1]"),
    ("streaming:sinks=-1", "sinks must be an integer in [0, 64]"),
    ("streaming:sinks=2.5", "sinks must be an integer in [0, 64]"),
    ("full:budget=0.5", "strategy 'full' has no parameter 'budget'; it takes: none"),
])
def test_bad_specs_raise_one_line_config_errors(spec, words):
    """Every bad spec is a KVConfigError whose single line says what is wrong and what is allowed."""
    with pytest.raises(KVConfigError) as info:
        parse_strategy(spec)
    message = str(info.value)
    assert words in message
    assert "\n" not in message


def test_unknown_strategy_lists_every_known_one():
    """The message names the strategies the user can pick from."""
    with pytest.raises(KVConfigError) as info:
        parse_strategy("nosuch")
    assert {"full", "streaming"} <= set(STRATEGIES)
    for name in STRATEGIES:
        assert name in str(info.value)


def test_streaming_capacity_follows_the_budget():
    """Fractions round up, token counts are absolute, both are capped by the context and floored at sinks+1."""
    request = Request("r", 0.0, tuple(range(4, 54)), 10)  # context 60
    assert parse_strategy("streaming:budget=0.5").capacity(request) == 30
    assert parse_strategy("streaming:budget=0.31").capacity(request) == math.ceil(0.31 * 60)
    assert parse_strategy("streaming:budget=24").capacity(request) == 24
    assert parse_strategy("streaming:budget=500").capacity(request) == 60
    assert parse_strategy("streaming:budget=0.01,sinks=4").capacity(request) == 5
    assert parse_strategy("full").capacity(request) == 60


# ---------------------------------------------------------------- behaviour on the tiny model

def test_streaming_at_full_budget_matches_full_cache(tiny):
    """Budget 1.0 evicts nothing, so its greedy tokens must equal the full cache's (re-rotation is exact)."""
    trace = make_trace(tiny)
    _, full_result, full = run(tiny, "full", trace)
    _, streaming_result, streaming = run(tiny, "streaming:budget=1.0", trace)
    assert streaming == full
    assert all(len(set(tokens)) > 5 for tokens in full.values()), "degenerate outputs make this comparison vacuous"
    assert streaming_result.counters.tokens_evicted == 0
    assert streaming_result.counters == full_result.counters


def test_small_budget_changes_the_tokens(tiny):
    """The equality above can fail: a cache that really evicts produces different greedy tokens."""
    trace = make_trace(tiny)
    _, _, full = run(tiny, "full", trace)
    _, result, small = run(tiny, "streaming:budget=16", trace)
    assert result.counters.tokens_evicted > 0
    assert sum(a != b for r in full for a, b in zip(full[r], small[r])) > len(trace) * 3


@pytest.mark.parametrize("budget,sinks", [(24, 4), (52, 2), (40, 0)],
                         ids=["evict-in-prefill", "evict-in-decode-only", "no-sinks"])
def test_streaming_matches_the_reference_in_a_batch(tiny, budget, sinks):
    """Tokens from batched continuous decoding equal a one-request-at-a-time StreamingLLM reference."""
    trace = make_trace(tiny)
    _, _, got = run(tiny, f"streaming:budget={budget},sinks={sinks}", trace)
    for request in trace.requests:
        capacity = min(budget, request.context_tokens)
        expected = streaming_reference(tiny, request.prompt_ids, request.max_new_tokens, capacity, sinks)
        assert got[request.id] == expected, request.id


def test_reference_tells_rerotation_apart(tiny):
    """Keeping original key positions (no re-rotation, kvpress issue 158) gives other tokens than the engine."""
    trace = make_trace(tiny, num_requests=2)
    _, _, got = run(tiny, "streaming:budget=24,sinks=4", trace)
    differing = 0
    for request in trace.requests:
        stale = streaming_reference(tiny, request.prompt_ids, request.max_new_tokens, 24, 4, rerotate=False)
        differing += got[request.id] != stale
    assert differing > 0


@pytest.mark.parametrize("prompt_len,output_len,budget", [(40, 10, 24), (20, 12, 24), (20, 4, 24)],
                         ids=["evict-in-prefill", "evict-in-decode", "no-eviction"])
def test_streaming_holds_exactly_sinks_plus_recent(tiny, prompt_len, output_len, budget):
    """After prefill and after every decode step the slot holds the K/V of exactly the sink and most recent
    positions (keys rotated once at their own position), and the counters say so: evicted = stored - kept."""
    sinks = 4
    trace = make_trace(tiny, num_requests=1, prompt_len=prompt_len, output_len=output_len, range_ratio=0.0)
    engine = HFEngine(tiny, parse_strategy(f"streaming:budget={budget},sinks={sinks}"))
    snapshots = []

    def snapshot(_):
        cache = engine.cache
        kept = cache.kept[0]
        snapshots.append((kept, cache.counters.tokens_stored, cache.counters.tokens_evicted,
                          torch.cat([cache.k[0, 0, :, :kept], cache.v[0, 0, :, :kept]], dim=-1).clone()))

    result = engine.run(trace, on_token=snapshot)
    request = trace.requests[0]
    output = result.records[0].output_ids
    assert len(snapshots) == request.max_new_tokens  # after prefill, then after each decode step
    k_ref, v_ref = layer0_kv(tiny, list(request.prompt_ids) + output[:-1])
    for step, (kept, stored, evicted, cells) in enumerate(snapshots):
        n = len(request.prompt_ids) + step  # tokens that went through the cache so far
        keep = kept_positions(n, budget, sinks)
        assert (kept, stored, evicted) == (len(keep), n, n - len(keep)), f"step {step}"
        keys = rotate(k_ref[:, keep], torch.tensor(keep), rope_theta(tiny.config))
        expected = torch.cat([keys, v_ref[:, keep]], dim=-1)
        match_rows(cells.transpose(0, 1).flatten(1), expected.transpose(0, 1).flatten(1))
    c = result.counters
    final = kept_positions(len(request.prompt_ids) + request.max_new_tokens - 1, budget, sinks)
    assert c.tokens_kept_final == len(final)
    assert c.peak_resident_bytes == len(final) * tiny.kv_bytes_per_token
    assert c.resident_bytes == 0


def test_full_cache_stores_rotated_keys_in_position_order(tiny):
    """The full cache keeps every token, key rotated once at its own position, in order."""
    trace = make_trace(tiny, num_requests=1, prompt_len=20, output_len=6, range_ratio=0.0)
    engine, result, got = run(tiny, "full", trace)
    request = trace.requests[0]
    sequence = list(request.prompt_ids) + got[request.id][:-1]
    k_ref, v_ref = layer0_kv(tiny, sequence)
    n = len(sequence)
    assert result.counters.tokens_kept_final == n
    torch.testing.assert_close(engine.cache.k[0, 0, :, :n], rotate(k_ref, torch.arange(n), rope_theta(tiny.config)),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(engine.cache.v[0, 0, :, :n], v_ref, rtol=1e-4, atol=1e-5)


def test_streaming_counters_over_a_batch(tiny):
    """Exact counters over several requests: stored = prompt + output - 1 each, evicted = stored - kept."""
    trace = make_trace(tiny, num_requests=5, prompt_len=30, output_len=10, range_ratio=0.3, seed=8)
    strategy = parse_strategy("streaming:budget=0.5,sinks=4")
    _, result, _ = run(tiny, strategy, trace)
    stored = [len(r.prompt_ids) + r.max_new_tokens - 1 for r in trace.requests]
    kept = [min(s, strategy.capacity(r)) for s, r in zip(stored, trace.requests)]
    c = result.counters
    assert c.tokens_stored == sum(stored)
    assert c.tokens_kept_final == sum(kept)
    assert c.tokens_evicted == sum(stored) - sum(kept) > 0
    assert (c.bytes_to_host, c.bytes_to_device, c.preemptions, c.resident_bytes) == (0, 0, 0, 0)


def test_streaming_peak_bytes_stay_at_the_budget(tiny):
    """Eviction must free memory: with equal requests all resident at once the peak is exactly n x budget."""
    trace = make_trace(tiny, num_requests=3, prompt_len=40, output_len=8, range_ratio=0.0)
    _, result, _ = run(tiny, "streaming:budget=16", trace)
    _, full_result, _ = run(tiny, "full", trace)
    assert result.counters.peak_resident_bytes == 3 * 16 * tiny.kv_bytes_per_token
    assert full_result.counters.peak_resident_bytes == 3 * (40 + 8 - 1) * tiny.kv_bytes_per_token
