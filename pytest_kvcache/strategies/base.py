"""The KV storage the hf engine owns and the strategy interface every policy implements.

Storage is preallocated per layer as slots (one per running request) of `slot_tokens` tokens, so a strategy that
keeps fewer tokens really needs less memory, and no step copies the whole cache (DynamicCache's torch.cat does).
Running requests always occupy slots 0..B-1, so batched decode attends over a view, never a per-request loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.metrics import KVCounters
from pytest_kvcache.models import LoadedModel
from pytest_kvcache.traces import Request


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, L, D) by RoPE angles cos/sin (B, L, D), exactly as transformers' Llama does."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def parse_budget(value: float | int) -> float | int:
    """A budget is a fraction of each request's full context in (0, 1], or a whole number of tokens >= 2."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise KVConfigError(f"budget must be a fraction in (0, 1] or a token count >= 2, got {value!r}")
    if isinstance(value, int) and value >= 2:
        return value
    if 0 < value <= 1:
        return float(value)
    raise KVConfigError(
        f"budget must be a fraction in (0, 1] of each request's context or a whole token count >= 2, got {value}"
    )


def budget_tokens(budget: float | int, request: Request, minimum: int = 1) -> int:
    """Tokens one request may keep under a budget, never more than its full context."""
    context = request.context_tokens
    tokens = budget if isinstance(budget, int) else math.ceil(budget * context)
    return max(minimum, min(tokens, context))


@dataclass
class DecodeStep:
    """Per-step tensors shared by all layers of one batched decode."""

    batch: int
    write_index: torch.Tensor
    query_cos: torch.Tensor
    query_sin: torch.Tensor
    mask: torch.Tensor
    span: int
    extra: dict


class SlotCache:
    """Full cache: every token's K/V is kept, keys rotated once when stored. Policies subclass the hooks.

    Shapes: k, v are (layers, slots, kv_heads, slot_tokens, head_dim); a query is (B, q_heads, q_len, head_dim).
    The model runs with RoPE disabled (position 0), so this cache decides each token's position.
    """

    def __init__(self, strategy: KVStrategy, model: LoadedModel, n_slots: int, slot_tokens: int) -> None:
        self.strategy = strategy
        self.model = model
        self.n_slots = n_slots
        self.slot_tokens = slot_tokens
        shape = (model.num_layers, n_slots, model.num_kv_heads, slot_tokens, model.head_dim)
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.v = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.rotary = model.model.model.rotary_emb
        self.kept = [0] * n_slots
        self.seen = [0] * n_slots
        self.limit = [0] * n_slots
        self.counters = KVCounters()
        self.token_bytes = model.kv_bytes_per_token
        self.step: DecodeStep | None = None

    @property
    def allocated_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, L, D) for integer positions (B, L), from the model's own rotary embedding."""
        return self.rotary(self.v, positions)

    def attach(self, model: LoadedModel) -> list:
        """Register forward hooks a policy needs (e.g. speculation from a layer's input); the engine removes them."""
        return []

    def can_admit(self, running: int, tokens: int) -> bool:
        """Whether one more request of `tokens` tokens fits next to `running` ones (slots reserve their maximum)."""
        return running < self.n_slots

    def make_room(self, batch: int) -> int:
        """How many running requests must be preempted before a decode step of `batch`; slots never need to."""
        return 0

    def preempt(self, slot: int) -> object | None:
        """Free a running request's KV; return what resume() needs (a host copy) or None to recompute it."""
        raise NotImplementedError(f"{type(self).__name__} reserves whole slots and never preempts")

    def resume(self, slot: int, saved: object) -> None:
        """Bring a preempted request's KV back from its host copy into `slot`."""
        raise NotImplementedError(f"{type(self).__name__} reserves whole slots and never preempts")

    def admit(self, slot: int, request: Request) -> None:
        self.kept[slot] = 0
        self.seen[slot] = 0
        self.limit[slot] = self.strategy.capacity(request)

    def release(self, slot: int) -> None:
        self.counters.tokens_kept_final += self.kept[slot]
        self.counters.add_resident(-self.kept[slot] * self.token_bytes)
        self.kept[slot] = 0

    def move(self, src: int, dst: int) -> None:
        """Move a running request's KV into a freed slot so running slots stay contiguous."""
        n = self.kept[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.kept[dst], self.seen[dst], self.limit[dst] = self.kept[src], self.seen[src], self.limit[src]
        self.kept[src] = 0

    def _account(self, slot: int, kept_before: int, new_tokens: int) -> None:
        self.counters.tokens_stored += new_tokens
        evicted = kept_before + new_tokens - self.kept[slot]
        self.counters.tokens_evicted += evicted
        self.counters.add_resident((self.kept[slot] - kept_before) * self.token_bytes)

    def attend_prompt(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output, rotated q, rotated k) of full causal attention over a prompt at positions 0..P-1; every policy
        prefills through this one call, so a budget holding the whole context matches the full cache bit for bit."""
        cos, sin = self.angles(torch.arange(q.shape[2], device=q.device).unsqueeze(0))
        q_rot, k_rot = rope(q, cos, sin), rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q_rot, k_rot, v, is_causal=True, scale=scale, enable_gqa=True)
        return out, q_rot, k_rot

    def prefill(self, layer: int, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal attention over the whole prompt, then the policy stores what it keeps. q/k/v are pre-RoPE."""
        out, _, k_rot = self.attend_prompt(q, k, v, scale)
        self.store_prefill(layer, slot, k, k_rot, v)
        return out

    def store_prefill(self, layer: int, slot: int, k: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor) -> None:
        length = k.shape[2]
        self.k[layer, slot, :, :length] = k_rot[0]
        self.v[layer, slot, :, :length] = v[0]

    def finish_prefill(self, slot: int, prompt_tokens: int) -> None:
        kept_before = self.kept[slot]
        self.seen[slot] = prompt_tokens
        self.kept[slot] = self.kept_after_prefill(slot, prompt_tokens)
        self._account(slot, kept_before, prompt_tokens)

    def kept_after_prefill(self, slot: int, prompt_tokens: int) -> int:
        return prompt_tokens

    def begin_decode(self, batch: int) -> None:
        """Positions, write indices and the validity mask for one decode step of slots 0..batch-1."""
        device = self.v.device
        write = torch.tensor(self.kept[:batch], device=device)
        span = max(self.kept[:batch]) + 1
        positions = torch.tensor(self.seen[:batch], device=device).unsqueeze(1)
        cos, sin = self.angles(positions)
        valid = torch.arange(span, device=device).unsqueeze(0) <= write.unsqueeze(1)
        self.step = DecodeStep(batch, write, cos, sin, valid[:, None, None, :], span, {})

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        step = self.step
        rows = torch.arange(step.batch, device=q.device)
        q_rot, k_rot = rope(q, step.query_cos, step.query_sin), rope(k, step.query_cos, step.query_sin)
        self.k[layer, rows, :, step.write_index] = k_rot[:, :, 0]
        self.v[layer, rows, :, step.write_index] = v[:, :, 0]
        keys = self.k[layer, : step.batch, :, : step.span]
        values = self.v[layer, : step.batch, :, : step.span]
        return F.scaled_dot_product_attention(q_rot, keys, values, attn_mask=step.mask, scale=scale, enable_gqa=True)

    def finish_decode(self) -> None:
        for slot in range(self.step.batch):
            kept_before = self.kept[slot]
            self.seen[slot] += 1
            self.kept[slot] = kept_before + 1
            self._account(slot, kept_before, 1)
        self.step = None


STRATEGIES: dict[str, type[KVStrategy]] = {}


@dataclass(frozen=True)
class KVStrategy:
    """A KV-cache policy: its parameters, how many slot tokens a request needs, and the cache that applies it.

    Subclasses set `name` and `cache_class` and register themselves by name for parse_strategy().
    """

    name: ClassVar[str] = ""
    cache_class: ClassVar[type[SlotCache]] = SlotCache
    reserves_slots: ClassVar[bool] = True
    engine: ClassVar[str] = "hf"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            STRATEGIES[cls.name] = cls

    def capacity(self, request: Request) -> int:
        return request.context_tokens

    def slot_bytes(self, model: LoadedModel, slot_tokens: int) -> int:
        """Device bytes one slot of `slot_tokens` allocates; the KV memory limit buys slots at this price."""
        return slot_tokens * model.kv_bytes_per_token

    def make_cache(self, model: LoadedModel, n_slots: int, slot_tokens: int,
                   kv_limit_bytes: int | None = None) -> SlotCache:
        """The cache for one run; slot-reserving strategies are already sized by the limit (see HFEngine.plan_slots)."""
        return self.cache_class(self, model, n_slots, slot_tokens)

    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def label(self) -> str:
        """`name:key=value,...` with the budget and the parameters that differ from their defaults
        (parse_strategy reads it back)."""
        changed = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name == "budget" or getattr(self, f.name) != f.default
        }
        params = ",".join(f"{k}={v}" for k, v in changed.items())
        return f"{self.name}:{params}" if params else self.name
