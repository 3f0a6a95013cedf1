"""StreamingLLM: attention sinks plus a window of recent tokens.

Follows Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024), Section 3.2 and
the mit-han-lab/streaming-llm `pos_shift` code: the cache keeps the first `sinks` tokens and the most recent
`budget - sinks`; keys are cached *before* RoPE and re-rotated every step to their position inside the cache
(not in the original text), and the query takes the next cache position. The prompt is prefilled with full
attention, then cut to the budget (as KV-budget studies do); each decode step evicts the oldest non-sink token
once the budget is full, so memory stays at the budget.

The recent window is a ring buffer per slot: eviction overwrites one cell instead of shifting the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.strategies.base import DecodeStep, KVStrategy, SlotCache, budget_tokens, parse_budget, rope
from pytest_kvcache.traces import Request


class StreamingCache(SlotCache):
    """Slot layout: [0, sinks) sink tokens, [sinks, limit) a ring of recent tokens starting at `start[slot]`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sinks = self.strategy.sinks
        self.start = [0] * self.n_slots

    def admit(self, slot: int, request: Request) -> None:
        super().admit(slot, request)
        self.start[slot] = 0

    def move(self, src: int, dst: int) -> None:
        self.start[dst] = self.start[src]
        super().move(src, dst)

    def kept_after_prefill(self, slot: int, prompt_tokens: int) -> int:
        return min(prompt_tokens, self.limit[slot])

    def store_prefill(self, layer: int, slot: int, k: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor) -> None:
        length, limit = k.shape[2], self.limit[slot]
        if length <= limit:
            keep = torch.arange(length, device=k.device)
        else:
            recent = torch.arange(length - (limit - self.sinks), length, device=k.device)
            keep = torch.cat([torch.arange(self.sinks, device=k.device), recent])
        self.k[layer, slot, :, : keep.numel()] = k[0, :, keep]
        self.v[layer, slot, :, : keep.numel()] = v[0, :, keep]

    def begin_decode(self, batch: int) -> None:
        device = self.v.device
        kept = torch.tensor(self.kept[:batch], device=device)
        limit = torch.tensor(self.limit[:batch], device=device)
        start = torch.tensor(self.start[:batch], device=device)
        full = kept >= limit
        window = limit - self.sinks
        write = torch.where(full, self.sinks + start, kept)
        after = torch.where(full, kept, kept + 1)
        span = int(after.max())
        cells = torch.arange(span, device=device).unsqueeze(0)
        next_start = torch.where(full, (start + 1) % window, start)
        ring = self.sinks + (cells - self.sinks - next_start.unsqueeze(1)) % window.unsqueeze(1)
        positions = torch.where(cells < self.sinks, cells, ring)
        key_cos, key_sin = self.angles(positions)
        query_cos, query_sin = self.angles((after - 1).unsqueeze(1))
        valid = cells < after.unsqueeze(1)
        self.step = DecodeStep(batch, write, query_cos, query_sin, valid[:, None, None, :], span, {})
        self.step.extra.update(key_cos=key_cos, key_sin=key_sin, full=full.tolist())

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        step = self.step
        rows = torch.arange(step.batch, device=q.device)
        self.k[layer, rows, :, step.write_index] = k[:, :, 0]
        self.v[layer, rows, :, step.write_index] = v[:, :, 0]
        keys = rope(self.k[layer, : step.batch, :, : step.span], step.extra["key_cos"], step.extra["key_sin"])
        values = self.v[layer, : step.batch, :, : step.span]
        q_rot = rope(q, step.query_cos, step.query_sin)
        return F.scaled_dot_product_attention(q_rot, keys, values, attn_mask=step.mask, scale=scale, enable_gqa=True)

    def finish_decode(self) -> None:
        full = self.step.extra["full"]
        for slot in range(self.step.batch):
            kept_before = self.kept[slot]
            self.seen[slot] += 1
            if full[slot]:
                self.start[slot] = (self.start[slot] + 1) % (self.limit[slot] - self.sinks)
            else:
                self.kept[slot] += 1
            self._account(slot, kept_before, 1)
        self.step = None


@dataclass(frozen=True)
class Streaming(KVStrategy):
    """budget: fraction of each request's context in (0, 1] or a token count; sinks: attention-sink tokens (paper: 4)."""

    name = "streaming"
    cache_class = StreamingCache
    budget: float | int = 0.5
    sinks: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", parse_budget(self.budget))
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or not 0 <= self.sinks <= 64:
            raise KVConfigError(f"streaming: sinks must be an integer in [0, 64], got {self.sinks!r}")

    def capacity(self, request: Request) -> int:
        return budget_tokens(self.budget, request, minimum=self.sinks + 1)
