"""No KV cache: every decode step recomputes attention over the whole sequence, the work a cache removes.

The baseline every other strategy improves on (the seed material: GPT-Neo-1.3B decodes 2.9x slower without a KV
cache). Each step runs the model over every running request's prompt + generated tokens (one right-padded batch,
causal attention, the last position's logits), so a step costs a prefill of the whole context; nothing is stored,
so every KV counter stays 0. Never captured in a CUDA graph (the sequences grow every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pytest_kvcache.strategies.base import KVStrategy, SlotCache
from pytest_kvcache.traces import Request


class NoCache(SlotCache):
    """Keeps no K/V: slots only track how many tokens each request has seen."""

    capturable = False

    def __init__(self, strategy: KVStrategy, model, n_slots: int, slot_tokens: int) -> None:
        super().__init__(strategy, model, n_slots, 0)

    def store_prefill(self, layer: int, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Nothing is kept."""

    def finish_prefill(self, slot: int, prompt_tokens: int) -> None:
        self.seen[slot] = prompt_tokens

    def kept_after_prefill(self, slot: int, prompt_tokens: int) -> int:
        return 0

    def step_kv_bytes(self, batch: int) -> int:
        return 0

    def advance(self, batch: int) -> None:
        for slot in range(batch):
            self.seen[slot] += 1


@dataclass(frozen=True)
class NoKVCache(KVStrategy):
    """No parameters: the engine recomputes each step's attention from the tokens (`recomputes`)."""

    name = "none"
    cache_class = NoCache
    reserves_slots: ClassVar[bool] = False  # it keeps no KV: a KV limit does not bound how many requests run
    recomputes: ClassVar[bool] = True

    def capacity(self, request: Request) -> int:
        return 1

    def slot_bytes(self, model, slot_tokens: int, context_tokens: int | None = None) -> int:
        return 0
