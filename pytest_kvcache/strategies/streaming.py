"""StreamingLLM: attention sinks plus a window of recent tokens.

Follows Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024), Section 3.2 and the
mit-han-lab/streaming-llm `pos_shift` code: the cache keeps the first `sinks` tokens and the most recent
`budget - sinks`, and attention uses positions *inside the cache* (sinks at 0..sinks-1, the window after them in
order, the query at the next cache position), not the tokens' original positions. The prompt is prefilled with full
attention, then cut to the budget (as KV-budget studies do); each decode step evicts the oldest non-sink token once
the budget is full, so memory stays at the budget.

How the cache positions are applied (a deliberate difference from the reference, which caches keys before RoPE
and re-rotates every cached key every step): keys are stored rotated once at their original position, like the
full cache, and the *query* is rotated instead. RoPE scores depend only on the distance between query and key
positions: (R(a) q)·(R(b) k) = q·R(b - a) k. Every window token's cache position is its original position minus
one shared offset (the number of evicted tokens), so the query at its original position gives the window exactly
the cache-position distances; the sinks keep positions 0..sinks-1, so for them the query is rotated to its cache
position by R(cache - original) applied to the already rotated query (rotations compose: R(x) R(y) = R(x + y)).
So the scores equal the reference's in exact arithmetic, each step costs one extra query rotation instead of a
pass over the whole cache, and before any eviction the step is the full cache's bit for bit. The attention kernel
takes the second query for cells < sinks.

The recent window is a ring buffer per slot: eviction overwrites one cell instead of shifting the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.strategies.base import AttendSpec, KVStrategy, SlotCache, Step, budget_tokens, parse_budget, rope
from pytest_kvcache.traces import Request


class StreamingCache(SlotCache):
    """Slot layout: [0, sinks) sink tokens, [sinks, limit) a ring of recent tokens, the oldest at `start[slot]`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sinks = self.strategy.sinks
        if self.rotary.attention_scaling != 1.0:
            raise KVConfigError(f"streaming: model {self.model.name!r} scales its RoPE; query re-rotation needs plain RoPE")

    def step_fields(self) -> dict[str, int]:
        return {"write": 1, "lengths": 1, "shift": 1}

    def reset(self) -> None:
        super().reset()
        self.start = [0] * self.n_slots
        self.full = [False] * self.n_slots

    def admit(self, slot: int, request: Request) -> None:
        super().admit(slot, request)
        self.start[slot] = 0

    def move(self, src: int, dst: int) -> None:
        self.start[dst] = self.start[src]
        super().move(src, dst)

    def kept_after_prefill(self, slot: int, prompt_tokens: int) -> int:
        return min(prompt_tokens, self.limit[slot])

    def store_prefill(self, layer: int, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the sinks and the newest limit - sinks prompt tokens, keys rotated at their own positions."""
        length, limit = k.shape[2], self.limit[slot]
        if length <= limit:
            keep = torch.arange(length, device=k.device)
        else:
            recent = torch.arange(length - (limit - self.sinks), length, device=k.device)
            keep = torch.cat([torch.arange(self.sinks, device=k.device), recent])
        self.k[layer, slot, :, : keep.numel()] = k[0, :, keep]
        self.v[layer, slot, :, : keep.numel()] = v[0, :, keep]

    def prepare(self, batch: int) -> None:
        """A full slot overwrites its oldest window cell and keeps `limit` cells; the query's cache position is the
        last cell, `shift` = cache position - original position (0 until the first eviction)."""
        write, lengths, shift = [], [], []
        for s in range(batch):
            full = self.kept[s] >= self.limit[s]
            after = self.limit[s] if full else self.kept[s] + 1
            self.full[s] = full
            write.append(self.sinks + self.start[s] if full else self.kept[s])
            lengths.append(after)
            shift.append(after - 1 - self.seen[s])
        self.fields.set("write", write)
        self.fields.set("lengths", lengths)
        self.fields.set("shift", shift)
        self.span = max(lengths)
        self.attended = sum(lengths)
        self.shifted = any(shift)

    def begin_step(self, step: Step) -> None:
        """RoPE angles of each row's shift, once per step (every layer rotates its sink query by them); on CUDA
        always (the step is captured), on CPU only when a slot has evicted (before that the step is the full
        cache's bit for bit)."""
        self.sink_angles = None
        if self.sinks and (self.shifted or self.model.device.type == "cuda"):
            self.sink_angles = self.angles(self.fields["shift"][: step.batch, None])

    def store(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step,
              written: bool = False) -> AttendSpec:
        spec = super().store(layer, q, k, v, step, written)
        if self.sink_angles is not None:
            cos, sin = self.sink_angles
            if q.is_cuda:
                from pytest_kvcache import kernels

                spec.sink_query = kernels.rope_into(q, cos.view(step.batch, -1), sin.view(step.batch, -1))
            else:
                spec.sink_query = rope(q.unsqueeze(2), cos, sin).squeeze(2)
            spec.n_sink = self.sinks
        return spec

    def advance(self, batch: int) -> None:
        for slot in range(batch):
            kept_before = self.kept[slot]
            self.seen[slot] += 1
            if self.full[slot]:
                self.start[slot] = (self.start[slot] + 1) % (self.limit[slot] - self.sinks)
            else:
                self.kept[slot] += 1
            self._account(slot, kept_before, 1)


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
