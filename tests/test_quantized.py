"""KIVI quantized cache: quantization error bounds, byte packing, the prefill/decode split against a plain-torch
replica of the reference code (jy-yuan/KIVI models/llama_kivi.py), agreement with `full`, exact bytes, bad input."""

from __future__ import annotations

import pytest
import torch

from pytest_kvcache.engines.hf import HFEngine
from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.models import load_model
from pytest_kvcache.strategies import parse_strategy
from pytest_kvcache.strategies.base import rope
from pytest_kvcache.strategies.quantized import (
    Quantized,
    dequantize_keys,
    dequantize_values,
    pack_codes,
    quantize_keys,
    quantize_values,
    unpack_codes,
)
from pytest_kvcache.traces import Request, Trace

import cache_driver as drive


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def _prompt(n: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randint(0, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist())


def _trace(shapes: list[tuple[int, int]]) -> Trace:
    return Trace(tuple(Request(f"r{i}", 0.0, _prompt(p, i), out) for i, (p, out) in enumerate(shapes)))


def reference_minmax(block: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain min-max asymmetric quantization of `block` reduced along `dim`: codes, scale, min, each like block."""
    mn = block.min(dim=dim, keepdim=True).values
    scale = (block.max(dim=dim, keepdim=True).values - mn) / (2**bits - 1)
    return ((block - mn) / scale).clamp(0, 2**bits - 1).round(), scale.expand_as(block), mn.expand_as(block)


def reference_keys(k: torch.Tensor, group: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel over each group of `group` tokens, one group at a time: k (..., T, D)."""
    parts = [reference_minmax(k[..., g : g + group, :], -2, bits) for g in range(0, k.shape[-2], group)]
    return tuple(torch.cat([p[i] for p in parts], dim=-2) for i in range(3))


def reference_values(v: torch.Tensor, group: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token over each group of `group` head_dim entries, one group at a time: v (..., T, D)."""
    parts = [reference_minmax(v[..., c : c + group], -1, bits) for c in range(0, v.shape[-1], group)]
    return tuple(torch.cat([p[i] for p in parts], dim=-1) for i in range(3))


def _outlier_tensor(seed: int) -> torch.Tensor:
    """(2, 3, 64, 32) Gaussian with a few large channels, like real keys."""
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(seed))
    x[..., [3, 17]] *= 10
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_key_quantization_is_per_channel_and_within_half_a_step(bits):
    k, group = _outlier_tensor(0), 16
    codes, scale, zero = quantize_keys(k, group, bits)
    ref_codes, ref_scale, ref_zero = reference_keys(k, group, bits)
    assert torch.equal(codes.float(), ref_codes)
    assert torch.equal(scale, ref_scale[..., ::group, :]) and torch.equal(zero, ref_zero[..., ::group, :])
    error = (dequantize_keys(codes, scale, zero, group) - k).abs()
    assert torch.all(error <= ref_scale / 2 * (1 + 1e-5) + 1e-6)
    assert error.max() > ref_scale.max() / 2 * 0.5  # the bound is attained in order of magnitude, not vacuous


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_value_quantization_is_per_token_and_within_half_a_step(bits):
    v, group = _outlier_tensor(1), 8
    codes, scale, zero = quantize_values(v, group, bits)
    ref_codes, ref_scale, ref_zero = reference_values(v, group, bits)
    assert torch.equal(codes.float(), ref_codes)
    assert torch.equal(scale, ref_scale[..., ::group]) and torch.equal(zero, ref_zero[..., ::group])
    error = (dequantize_values(codes, scale, zero, group) - v).abs()
    assert torch.all(error <= ref_scale / 2 * (1 + 1e-5) + 1e-6)


def test_constant_group_dequantizes_exactly():
    k = torch.full((1, 1, 8, 4), 0.75)
    codes, scale, zero = quantize_keys(k, 8, 2)
    assert torch.equal(dequantize_keys(codes, scale, zero, 8), k)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_round_trips_codes(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 32), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 32 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_packing_layout_lowest_bits_first():
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_codes(torch.tensor([5, 10], dtype=torch.uint8), 4).tolist() == [5 | 10 << 4]


class ReferenceKivi:
    """One request's KIVI cache as jy-yuan/KIVI keeps it (concatenated tensors), with dequantized parts."""

    def __init__(self, k_rot: torch.Tensor, v: torch.Tensor, group: int, bits: int, residual: int) -> None:
        self.group, self.bits, self.residual = group, bits, residual
        length = k_rot.shape[1]
        if length % residual != 0:
            split = 0 if length < residual else length - length % residual
        else:
            split = length
        self.k_quant, self.k_full = self.keys(k_rot[:, :split]), k_rot[:, split:]
        cut = 0 if length <= residual else length - residual
        self.v_quant, self.v_full = self.values(v[:, :cut]), v[:, cut:]

    def keys(self, k: torch.Tensor) -> torch.Tensor:
        if k.shape[1] == 0:
            return k
        codes, scale, mn = reference_keys(k, self.group, self.bits)
        return codes * scale + mn

    def values(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape[1] == 0:
            return v
        codes, scale, mn = reference_values(v, self.group, self.bits)
        return codes * scale + mn

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q (Hq, 1, D), k/v (H, 1, D), k rotated: attention output (Hq, 1, D), then the reference's updates."""
        self.k_full = torch.cat([self.k_full, k], dim=1)
        self.v_full = torch.cat([self.v_full, v], dim=1)
        keys = torch.cat([self.k_quant, self.k_full], dim=1).repeat_interleave(q.shape[0] // k.shape[0], dim=0)
        values = torch.cat([self.v_quant, self.v_full], dim=1).repeat_interleave(q.shape[0] // k.shape[0], dim=0)
        out = torch.softmax(q @ keys.transpose(1, 2) * scale, dim=-1) @ values
        if self.k_full.shape[1] == self.residual:
            self.k_quant = torch.cat([self.k_quant, self.keys(self.k_full)], dim=1)
            self.k_full = self.k_full[:, :0]
        if self.v_full.shape[1] > self.residual:
            self.v_quant = torch.cat([self.v_quant, self.values(self.v_full[:, :1])], dim=1)
            self.v_full = self.v_full[:, 1:]
        return out


def test_decode_matches_reference_kivi_split_and_timing(tiny):
    """Batched slots of different lengths (prompt > R, < R, == 2R) flush keys and shift values as KIVI does,
    also after a finished request's slot is refilled by a move."""
    strategy = Quantized(bits=2, group_size=8, residual=16)
    prompts, steps, scale = [37, 10, 32], 24, 32**-0.5
    cache = strategy.make_cache(tiny, n_slots=3, slot_tokens=64)
    gen = torch.Generator().manual_seed(7)
    refs = []
    for slot, length in enumerate(prompts):
        q, k, v = (torch.randn(1, h, length, 32, generator=gen) for h in (4, 2, 2))
        cache.admit(slot, Request(f"r{slot}", 0.0, (1,) * length, 64 - length))
        drive.prefill(cache, 0, slot, q, k, v)
        cache.finish_prefill(slot, length)
        cos, sin = cache.angles(torch.arange(length).unsqueeze(0))
        refs.append(ReferenceKivi(rope(k, cos, sin)[0], v[0], 8, 2, 16))
    for step in range(steps):
        if step == 12:  # slot 0 finishes; slot 2 moves into it, as the engine compacts slots
            cache.release(0)
            cache.move(2, 0)
            refs = [refs[2], refs[1]]
        batch = len(refs)
        positions = torch.tensor(cache.kept[:batch]).unsqueeze(1)
        q, k, v = (torch.randn(batch, h, 1, 32, generator=gen) for h in (4, 2, 2))
        cache.prepare(batch)
        out = drive.decode(cache, 0, q, k, v, scale)
        cache.advance(batch)
        cos, sin = cache.angles(positions)
        k_rot = rope(k, cos, sin)
        q_rot = rope(q, cos, sin)
        expected = torch.stack([ref.decode(q_rot[i], k_rot[i], v[i], scale) for i, ref in enumerate(refs)])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert cache.kq[:2] == [ref.k_quant.shape[1] for ref in refs] == [48, 32]
    assert cache.vq[:2] == [ref.v_quant.shape[1] for ref in refs] == [40, 18]


def _tokens(model, spec: str, trace: Trace) -> list[list[int]]:
    return [r.output_ids for r in HFEngine(model, parse_strategy(spec), max_batch=4).run(trace).records]


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def test_greedy_tokens_full_residual_equal_full_and_bits_order_quality(tiny):
    trace = _trace([(40, 12), (64, 16), (90, 10)])
    full = _tokens(tiny, "full", trace)
    assert _tokens(tiny, "quantized:residual=128", trace) == full  # 128 >= every context: nothing quantized
    two = _agreement(_tokens(tiny, "quantized:bits=2,group_size=8,residual=8", trace), full)
    four = _agreement(_tokens(tiny, "quantized:bits=4,group_size=8,residual=8", trace), full)
    assert two < 1.0
    assert four >= two


def _hand_bytes(tokens: int, keys_quantized: int, values_quantized: int) -> int:
    """tiny (4 layers, 2 kv heads, head_dim 32, fp32), 2 bits, group 8, per layer and head, K then V."""
    key_codes = keys_quantized * 32 * 2 // 8
    key_scales = 2 * (keys_quantized // 8) * 32 * 4
    key_residual = (tokens - keys_quantized) * 32 * 4
    value_codes = values_quantized * 32 * 2 // 8
    value_scales = 2 * values_quantized * (32 // 8) * 4
    value_residual = (tokens - values_quantized) * 32 * 4
    return 4 * 2 * (key_codes + key_scales + key_residual + value_codes + value_scales + value_residual)


def test_resident_and_allocated_bytes_are_exact(tiny):
    """Prompt 40, 12 new tokens, R 16: keys 32 quantized + 8 residual, values 24 + 16 after prefill."""
    engine = HFEngine(tiny, parse_strategy("quantized:bits=2,group_size=8,residual=16"), max_batch=1)
    counters = engine.run(_trace([(40, 12)])).counters
    states = [(n, 32 if n < 48 else 48, n - 16) for n in range(40, 52)]  # keys flush 16 when n reaches 48
    assert _hand_bytes(*states[0]) == 42496 and _hand_bytes(*states[-1]) == 46016
    assert counters.peak_resident_bytes == max(_hand_bytes(*s) for s in states) == _hand_bytes(47, 32, 31) == 51904
    assert counters.resident_bytes == 0
    assert (counters.tokens_stored, counters.tokens_kept_final, counters.tokens_evicted) == (51, 51, 0)
    # one slot of 52 tokens: 48 key codes (6 groups) + 16 residual cells, 36 value codes + 16 residual cells
    per_head = 48 * 8 + 2 * 6 * 32 * 4 + 16 * 128 + 36 * 8 + 2 * 36 * 4 * 4 + 16 * 128
    assert engine.cache.allocated_bytes == 4 * 2 * per_head == 59648 < 52 * tiny.kv_bytes_per_token
    assert engine.strategy.slot_bytes(tiny, 52) == 59648


@pytest.mark.parametrize(
    "spec, name",
    [
        ("quantized:bits=3", "bits"),
        ("quantized:bits=16", "bits"),
        ("quantized:group_size=12", "group_size"),
        ("quantized:group_size=0", "group_size"),
        ("quantized:group_size=8,residual=20", "residual"),
        ("quantized:group_size=16,residual=8", "residual"),
        ("quantized:residual=0", "residual"),
    ],
)
def test_bad_settings_raise_one_line(spec, name):
    with pytest.raises(KVConfigError) as err:
        parse_strategy(spec)
    assert name in str(err.value) and "\n" not in str(err.value)


def test_group_size_must_divide_head_dim(tiny):
    with pytest.raises(KVConfigError, match="head_dim 32") as err:
        Quantized(group_size=64, residual=128).make_cache(tiny, n_slots=1, slot_tokens=16)
    assert "\n" not in str(err.value)
