"""The Triton kernels of the CUDA decode step against plain-torch references, and the engine's kernel path against
its module path. tests/test_kernels.py runs this file in its own process: on CUDA as it is, elsewhere in Triton's
interpreter (TRITON_INTERPRET=1, float32), which must be set before anything imports triton."""

import math

import pytest
import torch

from pytest_kvcache import kernels, split_k
from pytest_kvcache.engines.attention import attention_weights
from pytest_kvcache.engines.hf import HFEngine
from pytest_kvcache.models import load_model
from pytest_kvcache.strategies import parse_strategy
from pytest_kvcache.strategies.h2o import prefill_scores
from pytest_kvcache.traces import TraceSpec, synthetic

CUDA = torch.cuda.is_available()

DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
TOLERANCE = 2e-2 if CUDA else 1e-5


def reference(q, keys, values, lengths, scale, table=None, sink=None, n_sink=0):
    """Per row: softmax over its first lengths[r] cells (gathered through the block table), float64."""
    rows, q_heads, dim = q.shape
    kv_heads = keys.shape[1]
    out, logits = torch.zeros(rows, q_heads, dim, dtype=torch.float64), {}
    for r in range(rows):
        n = int(lengths[r])
        if n == 0:
            continue
        if table is not None:
            blocks = table[r, : math.ceil(n / keys.shape[2])]
            k = keys[blocks].transpose(0, 1).reshape(kv_heads, -1, dim)[:, :n]
            v = values[blocks].transpose(0, 1).reshape(kv_heads, -1, dim)[:, :n]
        else:
            k, v = keys[r, :, :n], values[r, :, :n]
        k = k.double().repeat_interleave(q_heads // kv_heads, 0)
        v = v.double().repeat_interleave(q_heads // kv_heads, 0)
        s = torch.einsum("hd,hnd->hn", q[r].double(), k) * scale
        if sink is not None:
            s[:, :n_sink] = torch.einsum("hd,hnd->hn", sink[r].double(), k[:, :n_sink]) * scale
        logits[r] = s
        out[r] = torch.einsum("hn,hnd->hd", s.softmax(-1), v)
    return out, logits


def rand(*shape):
    return torch.randn(*shape, device=DEVICE).to(DTYPE)


@pytest.mark.parametrize("shape", [(3, 8, 2, 32, 600), (2, 9, 3, 64, 300), (4, 4, 4, 16, 70)],
                         ids=["gqa4-3chunks", "gqa3-smollm2-heads", "mha"])
def test_split_k_attention_matches_reference(shape):
    """Ragged lengths (one spanning 3 chunks, one of 1 cell, one empty), logits and log-sum-exp, sink query;
    every valid output row is written, the counters are reset for the next launch (first case: autotuned launch,
    which runs every configuration)."""
    rows, q_heads, kv_heads, dim, cells = shape
    q, sink = rand(rows, q_heads, dim), rand(rows, q_heads, dim)
    keys, values = rand(rows + 1, kv_heads, cells, dim), rand(rows + 1, kv_heads, cells, dim)
    lengths = torch.tensor([cells, 1, 257, 0][:rows], device=DEVICE).clamp(max=cells)
    workspace = kernels.DecodeWorkspace(rows, kv_heads, q_heads // kv_heads, dim, cells, DEVICE)
    out = torch.full((rows, q_heads, dim), float("nan"), dtype=DTYPE, device=DEVICE)
    logits = torch.full((rows, q_heads, cells), float("nan"), device=DEVICE)
    lse = torch.zeros(rows, q_heads, device=DEVICE)
    kernels.decode_attention(q, keys, values, lengths, 0.1, workspace, out, sink_query=sink, n_sink=4,
                             logits=logits, lse=lse, tuned=rows == 3)
    expected, expected_logits = reference(q.cpu(), keys.cpu(), values.cpu(), lengths.cpu(), 0.1, sink=sink.cpu(),
                                          n_sink=4)
    for r, s in expected_logits.items():
        n = int(lengths[r])
        torch.testing.assert_close(out[r].double().cpu(), expected[r], atol=TOLERANCE, rtol=TOLERANCE)
        torch.testing.assert_close(logits[r, :, :n].double().cpu(), s, atol=TOLERANCE, rtol=TOLERANCE)
        torch.testing.assert_close(lse[r].double().cpu(), torch.logsumexp(s, -1), atol=TOLERANCE, rtol=TOLERANCE)
    assert int(workspace.locks.sum()) == 0


def test_split_k_attention_through_a_block_table():
    """Paged layout: each row's cells live in scattered blocks of 16; 190 cells span 12 blocks and 1 chunk."""
    rows, q_heads, kv_heads, dim, block, n_blocks = 3, 8, 2, 32, 16, 40
    keys, values = rand(n_blocks, kv_heads, block, dim), rand(n_blocks, kv_heads, block, dim)
    gen = torch.Generator().manual_seed(0)
    table = torch.stack([torch.randperm(n_blocks, generator=gen)[:12] for _ in range(rows)]).to(DEVICE)
    lengths = torch.tensor([190, 17, 64], device=DEVICE)
    q = rand(rows, q_heads, dim)
    workspace = kernels.DecodeWorkspace(rows, kv_heads, q_heads // kv_heads, dim, 12 * block, DEVICE)
    out = torch.empty(rows, q_heads, dim, dtype=DTYPE, device=DEVICE)
    kernels.decode_attention(q, keys, values, lengths, 0.2, workspace, out, block_table=table)
    expected, _ = reference(q.cpu(), keys.cpu(), values.cpu(), lengths.cpu(), 0.2, table=table.cpu())
    torch.testing.assert_close(out.double().cpu(), expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_h2o_update_matches_the_torch_rule():
    """The fused H2O launch: scores += weights from logits (new cell from its own weight), and in full slots the
    lowest-scoring cell older than the window takes the new cell's K/V/score/position; others are untouched."""
    rows, q_heads, kv_heads, dim, cells = 3, 4, 2, 32, 40
    logits = torch.randn(rows, q_heads, cells, device=DEVICE)
    lengths = torch.tensor([40, 21, 33], device=DEVICE)
    lse = torch.stack([torch.logsumexp(logits[r, :, : int(lengths[r])], -1) for r in range(rows)])
    score = torch.rand(rows, kv_heads, cells, device=DEVICE) * 3
    pos = torch.stack([torch.randperm(100, generator=torch.Generator().manual_seed(r))[:cells]
                       for r in range(rows * kv_heads)]).view(rows, kv_heads, cells).to(DEVICE)
    keys, values = rand(rows, kv_heads, cells, dim), rand(rows, kv_heads, cells, dim)
    write, full = lengths - 1, torch.tensor([1, 0, 1], device=DEVICE)
    window, position = torch.tensor([60, 50, 70], device=DEVICE), torch.tensor([99, 98, 97], device=DEVICE)
    expected = [t.clone() for t in (score, pos, keys, values)]
    weights = torch.exp(logits - lse[..., None]).view(rows, kv_heads, -1, cells).sum(2)
    for r in range(rows):
        n, w = int(lengths[r]), int(write[r])
        for h in range(kv_heads):
            s, p, k, v = (t[r, h] for t in expected)
            s[w], p[w] = 0.0, position[r]
            s[:n] += weights[r, h, :n]
            if full[r]:
                masked = torch.where((torch.arange(cells, device=DEVICE) < n) & (p < window[r]), s, math.inf)
                victim = int(masked.argmin())
                s[victim], p[victim], k[victim], v[victim] = s[w].clone(), p[w].clone(), k[w].clone(), v[w].clone()
    kernels.h2o_update(logits, lse, score, pos, keys, values, lengths, write, full, window, position)
    for got, want in zip((score, pos, keys, values), expected):
        torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE, rtol=TOLERANCE)


def test_h2o_weights_from_logits_equal_a_second_pass():
    """exp(logits - lse) summed over the group is the softmax weight matrix a separate pass computes."""
    rows, q_heads, kv_heads, dim, cells = 2, 8, 2, 32, 300
    q, keys, values = rand(rows, q_heads, dim), rand(rows, kv_heads, cells, dim), rand(rows, kv_heads, cells, dim)
    lengths = torch.tensor([300, 129], device=DEVICE)
    workspace = kernels.DecodeWorkspace(rows, kv_heads, q_heads // kv_heads, dim, cells, DEVICE)
    logits = torch.empty(rows, q_heads, cells, device=DEVICE)
    lse = torch.empty(rows, q_heads, device=DEVICE)
    out = torch.empty(rows, q_heads, dim, dtype=DTYPE, device=DEVICE)
    kernels.decode_attention(q, keys, values, lengths, 0.1, workspace, out, logits=logits, lse=lse)
    cells_index = torch.arange(cells, device=DEVICE)
    weights = torch.exp(logits - lse[..., None]).masked_fill(cells_index >= lengths[:, None, None], 0)
    grouped = weights.view(rows, kv_heads, -1, cells).sum(2)
    valid = torch.arange(cells, device=DEVICE)[None, :] < lengths[:, None]
    torch.testing.assert_close(grouped, attention_weights(q, keys, valid, 0.1), atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("shape", [(4, 2, 100, 32), (9, 3, 130, 64)])
def test_causal_column_sums_equal_the_chunked_softmax(shape):
    """H2O's prefill scores: the two-pass kernel against explicit causal softmax column sums."""
    q_heads, kv_heads, length, dim = shape
    q, k = rand(q_heads, length, dim), rand(kv_heads, length, dim)
    expected = prefill_scores(q.cpu().float(), k.cpu().float(), 0.3)
    got = kernels.causal_column_sums(q, k, 0.3).cpu()
    torch.testing.assert_close(got, expected, atol=TOLERANCE * 10, rtol=TOLERANCE)
    assert abs(float(got.sum()) - q_heads * length) < TOLERANCE * q_heads * length


def test_fused_elementwise_kernels():
    """add + RMSNorm (residual updated in place), rotate-half RoPE in place, SiLU(gate) * up."""
    x, delta, weight = rand(5, 100), rand(5, 100), rand(100)
    expected_x = x.float() + delta.float()
    expected = weight.float() * (expected_x * torch.rsqrt(expected_x.pow(2).mean(-1, keepdim=True) + 1e-5))
    out = torch.empty_like(x)
    kernels.add_rmsnorm(x, delta, weight, 1e-5, out)
    torch.testing.assert_close(x.float(), expected_x, atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE * 4, rtol=TOLERANCE * 4)
    heads = rand(3, 5, 16)
    cos, sin = rand(3, 16), rand(3, 16)
    half = torch.cat([-heads[..., 8:], heads[..., :8]], -1)
    expected = heads.float() * cos[:, None].float() + half.float() * sin[:, None].float()
    kernels.rope_(heads, cos, sin)
    torch.testing.assert_close(heads.float(), expected, atol=TOLERANCE, rtol=TOLERANCE)
    gate_up = rand(4, 2 * 3000)
    act = torch.empty(4, 3000, dtype=DTYPE, device=DEVICE)
    kernels.silu_mul(gate_up, act)
    expected = torch.nn.functional.silu(gate_up[:, :3000].float()) * gate_up[:, 3000:].float()
    torch.testing.assert_close(act.float(), expected, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("rows", [1, 7, 16])
def test_split_k_partials_sum_to_the_product(rows):
    """Every split configuration's fp32 partials sum to x @ w.T, K not a multiple of the split; add_rmsnorm sums
    them as it adds a GEMM's output; more than 16 rows is refused."""
    n, k = 80, 300
    w, x = rand(n, k), rand(rows, k)
    expected = torch.nn.functional.linear(x, w).float()
    for config in split_k.CONFIGS:
        small = split_k.SplitConfig(32, 64, config.splits)  # the interpreter's speed: same splits, small tiles
        parts = split_k.split_k_linear(x, w, small)
        assert parts.shape == (config.splits, rows, n) and parts.dtype == torch.float32
        torch.testing.assert_close(parts.sum(0), expected, atol=TOLERANCE * 8, rtol=TOLERANCE)
    residual, weight = rand(rows, n), rand(n)
    via_parts, via_delta = residual.clone(), residual.clone()
    out_parts, out_delta = torch.empty_like(residual), torch.empty_like(residual)
    kernels.add_rmsnorm(via_parts, parts, weight, 1e-5, out_parts)
    kernels.add_rmsnorm(via_delta, parts.sum(0).to(DTYPE), weight, 1e-5, out_delta)
    torch.testing.assert_close(via_parts, via_delta, atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(out_parts, out_delta, atol=TOLERANCE, rtol=TOLERANCE)
    with pytest.raises(ValueError, match="at most 16 rows"):
        split_k.split_k_linear(rand(17, k), w, small)


@pytest.mark.skipif(CUDA, reason="exactness on CPU in float32; the GPU check is tests/test_cuda.py")
@pytest.mark.parametrize("spec", ["full", "streaming:budget=20", "h2o:budget=0.4", "paged:block_size=8"])
def test_engine_kernel_path_gives_the_module_paths_tokens(spec):
    """The fused-weights step with the Triton kernels (what CUDA runs) decodes the same greedy tokens and counters as
    the transformers-module step, with eviction (streaming's sink query, H2O's weights from logits) and paging."""
    tiny = load_model("tiny")
    trace = synthetic(TraceSpec(num_requests=3, rate=math.inf, prompt_len=40, output_len=4, range_ratio=0.3,
                                vocab_size=tiny.vocab_size, seed=3))
    modules = HFEngine(tiny, parse_strategy(spec)).run(trace)
    fused = HFEngine(tiny, parse_strategy(spec), kernels=True).run(trace)
    assert [r.output_ids for r in fused.records] == [r.output_ids for r in modules.records]
    assert fused.counters == modules.counters


def test_token_store_and_out_of_place_rope():
    """store_kv writes each row's K/V at (outer, cell) of a layer's storage; rope_store rotates q and k in place and
    writes the rotated k with v there; rope_into leaves its input alone."""
    keys, values = rand(5, 2, 9, 16), rand(5, 2, 9, 16)
    new_k, new_v = rand(3, 2, 16), rand(3, 2, 16)
    outer, cell = torch.tensor([4, 0, 2], device=DEVICE), torch.tensor([8, 0, 3], device=DEVICE)
    expected_k, expected_v = keys.clone(), values.clone()
    expected_k[outer, :, cell], expected_v[outer, :, cell] = new_k, new_v
    kernels.store_kv(keys, values, new_k, new_v, outer, cell)
    assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)
    qk, v, cos, sin = rand(3, 6, 16), rand(3, 2, 16), rand(3, 16), rand(3, 16)
    half = torch.cat([-qk[..., 8:], qk[..., :8]], -1)
    rotated = (qk.float() * cos[:, None].float() + half.float() * sin[:, None].float()).to(DTYPE)
    expected_k[outer, :, cell], expected_v[outer, :, cell] = rotated[:, 4:], v
    kernels.rope_store(qk, v, cos, sin, 4, keys, values, outer, cell)
    torch.testing.assert_close(qk, rotated, atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(keys, expected_k, atol=TOLERANCE, rtol=TOLERANCE)
    assert torch.equal(values, expected_v)
    x, cos, sin = rand(3, 4, 16), rand(3, 16), rand(3, 16)
    before = x.clone()
    half = torch.cat([-x[..., 8:], x[..., :8]], -1)
    expected = x.float() * cos[:, None].float() + half.float() * sin[:, None].float()
    torch.testing.assert_close(kernels.rope_into(x, cos, sin).float(), expected, atol=TOLERANCE, rtol=TOLERANCE)
    assert torch.equal(x, before)
