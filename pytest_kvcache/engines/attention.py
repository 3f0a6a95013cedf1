"""Decode attention over what a policy says to attend (an AttendSpec): masked SDPA on CPU, the split-K Triton
kernel on CUDA (pytest_kvcache/kernels.py).

Why a kernel of our own on CUDA: SDPA with a boolean mask and GQA dispatches to cuDNN, which re-plans every step as
the span grows (~45 ms of host time per step on an H200), and a padded mask reads every row up to the longest; the
split-K kernel takes per-request lengths, reads each KV head once for its query group and is captured in the step's
CUDA graph (benchmarks/gpu_decode.py compares it with padded SDPA and FlexAttention on a ragged batch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pytest_kvcache.strategies.base import AttendSpec, AttentionScores


def _gather(spec: AttendSpec, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (rows, Hkv, span, D) of the step: slot views, or each row's blocks in table order."""
    if spec.block_table is None:
        return spec.keys[:rows, :, : spec.span], spec.values[:rows, :, : spec.span]
    block = spec.keys.shape[2]
    table = spec.block_table[:rows, : math.ceil(spec.span / block)]
    heads, dim = spec.keys.shape[1], spec.keys.shape[3]
    keys = spec.keys[table].transpose(1, 2).reshape(rows, heads, -1, dim)[:, :, : spec.span]
    values = spec.values[table].transpose(1, 2).reshape(rows, heads, -1, dim)[:, :, : spec.span]
    return keys, values


def attention_weights(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention (B, Hkv, S) float32 of one query q (B, Hq, D) on keys (B, Hkv, S, D) under valid (B, S),
    query heads of a group summed per KV head."""
    batch, q_heads, dim = q.shape
    kv_heads = keys.shape[1]
    logits = (q.reshape(batch, kv_heads, q_heads // kv_heads, dim) * scale) @ keys.transpose(-1, -2)
    logits = logits.masked_fill(~valid[:, None, None, :], -math.inf)
    return torch.softmax(logits, dim=-1, dtype=torch.float32).sum(dim=2)


def reference_attention(q: torch.Tensor, spec: AttendSpec, scale: float) -> tuple[torch.Tensor, AttentionScores | None]:
    """(out (B, Hq, D), the weights (B, Hkv, span) if asked) in plain torch: the CPU path and the kernel's reference."""
    rows, q_heads, dim = q.shape
    keys, values = _gather(spec, rows)
    valid = torch.arange(spec.span, device=q.device)[None, :] < spec.lengths[:, None]
    if spec.sink_query is None:
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=valid[:, None, None, :],
                                             scale=scale, enable_gqa=True).squeeze(2)
    else:
        kv_heads = keys.shape[1]
        grouped = q.reshape(rows, kv_heads, -1, dim)
        logits = grouped @ keys.transpose(-1, -2) * scale
        sink = spec.sink_query.reshape(rows, kv_heads, -1, dim) @ keys[:, :, : spec.n_sink].transpose(-1, -2)
        logits[..., : spec.n_sink] = sink * scale
        weights = torch.softmax(logits.masked_fill(~valid[:, None, None, :], -math.inf), dim=-1)
        out = (weights @ values).reshape(rows, q_heads, dim)
    scores = AttentionScores(weights=attention_weights(q, keys, valid, scale)) if spec.want_probs else None
    return out, scores


class KernelAttention:
    """The CUDA path: the split-K kernel with a workspace sized once (rows, capacity), so graphs can capture it;
    tuned: autotune its configuration per shape (for captured steps, whose shapes all appear in the warm-up)."""

    def __init__(self, rows: int, kv_heads: int, q_heads: int, head_dim: int, capacity: int,
                 device: torch.device, want_probs: bool, tuned: bool = False) -> None:
        from pytest_kvcache import kernels

        self.kernels = kernels
        self.workspace = kernels.DecodeWorkspace(rows, kv_heads, q_heads // kv_heads, head_dim, capacity, device)
        self.capacity = capacity
        self.tuned = tuned
        self.logits = torch.empty((rows, q_heads, capacity), dtype=torch.float32, device=device) if want_probs else None
        self.lse = torch.empty((rows, q_heads), dtype=torch.float32, device=device) if want_probs else None

    def __call__(self, q: torch.Tensor, spec: AttendSpec, scale: float) -> tuple[torch.Tensor, AttentionScores | None]:
        rows, q_heads, _ = q.shape
        if spec.capacity > self.capacity:
            raise ValueError(f"attention workspace holds {self.capacity} cells, the step asks for {spec.capacity}")
        out = torch.empty((rows, q_heads, q.shape[2]), dtype=q.dtype, device=q.device)
        logits = self.logits[:rows, :, : spec.capacity] if spec.want_probs else None
        lse = self.lse[:rows] if spec.want_probs else None
        self.kernels.decode_attention(q, spec.keys, spec.values, spec.lengths, scale, self.workspace, out,
                                      block_table=spec.block_table, sink_query=spec.sink_query, n_sink=spec.n_sink,
                                      logits=logits, lse=lse, tuned=self.tuned)
        return out, AttentionScores(logits=logits, lse=lse) if spec.want_probs else None
