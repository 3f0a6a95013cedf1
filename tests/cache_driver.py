"""Drive a policy's cache for one layer as the engine's decoder does, with inputs a test chose.

Tests hand pre-RoPE q/k here; the driver rotates them at the positions the engine would (0..P-1 for a prompt, each
slot's `seen` for a decode step) and runs the CPU attention over the policy's AttendSpec.
"""

import torch

from pytest_kvcache.engines.attention import reference_attention
from pytest_kvcache.strategies.base import Step, rope


def prefill(cache, layer, slot, q, k, v):
    """Store a prompt: q (1, Hq, P, D), k/v (1, Hkv, P, D), q/k before RoPE."""
    cos, sin = cache.angles(torch.arange(q.shape[2]).unsqueeze(0))
    cache.store_prefill(layer, slot, rope(q, cos, sin), rope(k, cos, sin), v)


def step(cache, batch):
    """The engine's Step for slots 0..batch-1 (after cache.prepare)."""
    positions = torch.tensor(cache.seen[:batch])
    cos, sin = cache.angles(positions[:, None])
    step = Step(batch, positions, cos, sin)
    cache.begin_step(step)
    return step


def decode(cache, layer, q, k, v, scale, at=None):
    """One layer of a prepared decode step: q (B, Hq, 1, D), k/v (B, Hkv, 1, D) before RoPE; returns (B, Hq, 1, D)."""
    at = at or step(cache, q.shape[0])
    q_rot = rope(q, at.cos, at.sin)[:, :, 0]
    k_rot = rope(k, at.cos, at.sin)[:, :, 0]
    spec = cache.store(layer, q_rot, k_rot, v[:, :, 0], at)
    out, scores = reference_attention(q_rot, spec, scale)
    cache.observe(layer, spec, scores)
    return out.unsqueeze(2)
