"""The KV storage a policy owns and the narrow interface through which the engine drives it.

The engine owns slots (which request runs in which row), scheduling, preemption and victim order, the model
forward and the attention kernel. A policy stores what it keeps and says what a decode step attends over (an
`AttendSpec`); H2O also observes the attention it got. All per-step tensors live in static buffers
(`HostStaged`), filled on the host and uploaded with one copy, so a CUDA graph of the step reads the same memory
on every replay and a policy's step state is a typed object of its own, never a dictionary shared by all policies.

Storage is preallocated per layer as slots (one per running request) of `slot_tokens` cells, so a policy that keeps
fewer tokens really needs less memory, and no step copies the whole cache (DynamicCache's torch.cat does). Running
requests occupy slots 0..B-1: row r of a decode step is slot r.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
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


class HostStaged:
    """Named integer fields of `rows` entries (or rows x width) in one device buffer with a host twin.

    The host writes fields between steps; `upload()` copies them all to the device in one transfer (pinned, non
    blocking on CUDA). Device views never move, so a captured graph keeps reading the current values.
    """

    def __init__(self, device: torch.device, rows: int, **widths: int) -> None:
        self.rows = rows
        self._offsets: dict[str, tuple[int, int]] = {}
        total = 0
        for name, width in widths.items():
            self._offsets[name] = (total, width)
            total += rows * width
        cuda = device.type == "cuda"
        self.host = torch.zeros(max(total, 1), dtype=torch.long, pin_memory=cuda)
        self.device = torch.zeros_like(self.host, device=device) if cuda else self.host

    def _view(self, buffer: torch.Tensor, name: str) -> torch.Tensor:
        start, width = self._offsets[name]
        view = buffer[start : start + self.rows * width]
        return view if width == 1 else view.view(self.rows, width)

    def __getitem__(self, name: str) -> torch.Tensor:
        """The device view of a field: (rows,) or (rows, width) int64."""
        return self._view(self.device, name)

    def host_view(self, name: str) -> torch.Tensor:
        """The host twin of a field, for in-place edits between steps."""
        return self._view(self.host, name)

    def set(self, name: str, values) -> None:
        """Write the first len(values) rows of a field on the host."""
        values = torch.as_tensor(values, dtype=torch.long)
        self._view(self.host, name)[: len(values)] = values

    def upload(self) -> None:
        if self.device is not self.host:
            self.device.copy_(self.host, non_blocking=True)


class TransferTimer:
    """How much of the host<->device copy time stayed hidden under compute (CUDA events; nothing on CPU).

    A copy runs on a side stream between `copy_start` and `copy_end`; the compute stream reaches the point where it
    needs the data at `needed`. The part of the copy after `needed` stalls compute; the rest overlapped it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[torch.cuda.Event, torch.cuda.Event, torch.cuda.Event]] = []
        self.copy_ms = self.exposed_ms = 0.0

    def start(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        """Mark the start of a copy on `stream` (call before queueing it)."""
        if not self.cuda or stream is None:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def end(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        """Mark the end of a copy on `stream`; the compute stream waits on the returned event when it needs it."""
        return self.start(stream)

    def needed(self, started: torch.cuda.Event | None, ended: torch.cuda.Event | None) -> None:
        """The compute stream needs this copy's data now: it waits for it, and the wait is timed."""
        if started is None or ended is None:
            return
        stream = torch.cuda.current_stream()
        need = torch.cuda.Event(enable_timing=True)
        need.record(stream)
        stream.wait_event(ended)
        self.pending.append((started, ended, need))

    def fraction(self) -> float | None:
        """Overlapped share of all copy time so far (1: every copy hidden), or None without timed copies."""
        for started, ended, need in self.pending:
            ended.synchronize()
            need.synchronize()
            self.copy_ms += max(0.0, started.elapsed_time(ended))
            self.exposed_ms += max(0.0, need.elapsed_time(ended))
        self.pending = []
        if self.copy_ms <= 0:
            return None
        return max(0.0, 1.0 - self.exposed_ms / self.copy_ms)


@dataclass
class Step:
    """One batched decode step of rows 0..batch-1, as the engine prepared it: views of static device buffers."""

    batch: int
    positions: torch.Tensor  # (batch,) position of the token being decoded in its request (= tokens seen)
    cos: torch.Tensor  # (batch, 1, head_dim) RoPE of `positions`
    sin: torch.Tensor


@dataclass
class AttendSpec:
    """What one layer of one decode step attends over; the engine's attention kernel reads it.

    keys/values: (slots, kv_heads, cells, head_dim) where row r of the step reads slot r, or, with block_table
    (rows, max_blocks), a pool (blocks, kv_heads, block_size, head_dim). lengths (rows,): cells each row attends
    (the new token included); span: their maximum on the host (the CPU path attends over [:span] with a mask).
    sink_query (rows, q_heads, head_dim): the query for cells < n_sink (StreamingLLM's sinks). want_probs: return
    the softmax weights each cell got, summed over the query heads of its KV head (H2O).
    """

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor
    span: int
    block_table: torch.Tensor | None = None
    sink_query: torch.Tensor | None = None
    n_sink: int = 0
    want_probs: bool = False

    @property
    def capacity(self) -> int:
        """Cells a row can hold: the bound the attention kernel's workspace is sized for."""
        if self.block_table is not None:
            return self.block_table.shape[1] * self.keys.shape[2]
        return self.keys.shape[2]


@dataclass
class AttentionScores:
    """What attention returns when a spec asks (want_probs): the softmax weights (B, Hkv, W) of cells [0, W) summed
    over each KV head's query group (CPU), or the kernel's scaled logits (B, Hq, T) with each query head's
    log-sum-exp (B, Hq), from which the weights are exp(logits - lse) (CUDA: no second pass over the keys)."""

    weights: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lse: torch.Tensor | None = None


class SlotCache:
    """Full cache: every token's K/V is kept, rotated once at its own position. Policies subclass the hooks.

    Shapes: k, v are (layers, slots, kv_heads, slot_tokens, head_dim); queries and keys reach the cache rotated.
    `kept[s]` cells of slot s are in use, `seen[s]` tokens of its request went through it, `limit[s]` is its cap.
    """

    capturable: ClassVar[bool] = True  # decode is static-shape tensor work: the engine may capture it in a graph

    def __init__(self, strategy: KVStrategy, model: LoadedModel, n_slots: int, slot_tokens: int) -> None:
        self.strategy = strategy
        self.model = model
        self.n_slots = n_slots
        self.slot_tokens = slot_tokens
        shape = (model.num_layers, n_slots, model.num_kv_heads, slot_tokens, model.head_dim)
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.v = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.row_index = torch.arange(n_slots, device=model.device)
        self.fields = HostStaged(model.device, n_slots, **self.step_fields())
        self.reset()

    def step_fields(self) -> dict[str, int]:
        """The policy's per-row step fields and their widths (see HostStaged); `write` and `lengths` here."""
        return {"write": 1, "lengths": 1}

    def reset(self) -> None:
        """Forget every request (a new run); storage stays allocated."""
        self.kept = [0] * self.n_slots
        self.seen = [0] * self.n_slots
        self.limit = [0] * self.n_slots
        self.counters = KVCounters()
        self.transfers = TransferTimer(self.model.device)

    @property
    def token_bytes(self) -> int:
        return self.model.kv_bytes_per_token

    @property
    def allocated_bytes(self) -> int:
        """Bytes of KV storage this cache allocated (what a memory limit must cover)."""
        return self.k.numel() * self.k.element_size() * 2

    @property
    def rotary(self) -> torch.nn.Module:
        return self.model.model.model.rotary_emb

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, L, D) for integer positions (B, L), from the model's own rotary embedding."""
        return self.rotary(self.v, positions)

    def setup(self, decoder) -> None:
        """Once per cache, after the engine built its decoder and before any request (InfiniGen's warm-up)."""

    # ---------------------------------------------------------------- scheduling (the engine decides; paged differs)

    def can_admit(self, running: int, tokens: int) -> bool:
        """Whether one more request of `tokens` tokens fits next to `running` ones (slots reserve their maximum)."""
        return running < self.n_slots

    def reserve(self, slot: int, tokens: int) -> bool:
        """Make `slot` able to hold `tokens` tokens; False if memory is short (slots never are)."""
        return True

    def preempt(self, slot: int) -> object | None:
        """Free a running request's KV; return what resume() needs (a host copy) or None to recompute it."""
        raise NotImplementedError(f"{type(self).__name__} reserves whole slots and never preempts")

    def resume(self, slot: int, saved: object) -> None:
        """Bring a preempted request's KV back from its host copy into `slot`."""
        raise NotImplementedError(f"{type(self).__name__} reserves whole slots and never preempts")

    # ---------------------------------------------------------------- per-request bookkeeping

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

    # ---------------------------------------------------------------- prefill

    def store_prefill(self, layer: int, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep a prompt's K/V: q (1, Hq, P, D), k/v (1, Hkv, P, D), q and k rotated at positions 0..P-1. The
        engine computed full causal attention over the prompt already (every policy prefills the same way)."""
        length = k.shape[2]
        self.k[layer, slot, :, :length] = k[0]
        self.v[layer, slot, :, :length] = v[0]

    def finish_prefill(self, slot: int, prompt_tokens: int) -> None:
        kept_before = self.kept[slot]
        self.seen[slot] = prompt_tokens
        self.kept[slot] = self.kept_after_prefill(slot, prompt_tokens)
        self._account(slot, kept_before, prompt_tokens)

    def kept_after_prefill(self, slot: int, prompt_tokens: int) -> int:
        return prompt_tokens

    # ---------------------------------------------------------------- decode

    def prepare(self, batch: int) -> None:
        """Host side of a decode step of slots 0..batch-1: fill this policy's fields (uploaded by the engine)."""
        kept = self.kept[:batch]
        self.fields.set("write", kept)
        self.fields.set("lengths", [n + 1 for n in kept])
        self.span = max(kept) + 1
        self.attended = sum(kept) + batch

    def step_kv_bytes(self, batch: int) -> int:
        """KV bytes the last prepared step's attention must read (the roofline's KV term)."""
        return self.attended * self.token_bytes

    def begin_step(self, step: Step) -> None:
        """Once per decode step, inside the (captured) step, before the first layer: per-step device work shared
        by all layers (StreamingLLM's sink angles)."""

    def before_attention(self, layer: int, hidden: torch.Tensor, step: Step) -> None:
        """Called with layer's normed input (B, hidden) before its attention (InfiniGen speculates from it)."""

    def write_target(self, layer: int, step: Step) -> tuple[torch.Tensor, ...] | None:
        """Where the new token's K/V go: (keys, values, outer, cell) as store_kv takes them, so the engine can rotate
        and store in one launch; None when store() must do it (quantized or host-side storage)."""
        return self.k[layer], self.v[layer], self.row_index[: step.batch], self.fields["write"][: step.batch]

    def store(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step,
              written: bool = False) -> AttendSpec:
        """Store the new token's K/V (k/v (B, Hkv, D), rotated; `written`: the engine stored them at write_target)
        and say what the query (B, Hq, D) attends over."""
        if not written:
            self.write_token(*self.write_target(layer, step), k, v)
        return AttendSpec(self.k[layer], self.v[layer], self.fields["lengths"][: step.batch], self.span)

    def write_token(self, keys: torch.Tensor, values: torch.Tensor, outer: torch.Tensor, cell: torch.Tensor,
                    k: torch.Tensor, v: torch.Tensor) -> None:
        """keys[outer[r], :, cell[r]] = k[r] (values likewise) for every row: one Triton launch on CUDA."""
        if keys.is_cuda:
            from pytest_kvcache import kernels

            kernels.store_kv(keys, values, k, v, outer, cell)
        else:
            keys[outer, :, cell] = k
            values[outer, :, cell] = v

    def observe(self, layer: int, spec: AttendSpec, scores: AttentionScores | None) -> None:
        """After attention: what each cell got, when spec.want_probs."""

    def advance(self, batch: int) -> None:
        """Host bookkeeping after a decode step of slots 0..batch-1."""
        for slot in range(batch):
            kept_before = self.kept[slot]
            self.seen[slot] += 1
            self.kept[slot] = kept_before + 1
            self._account(slot, kept_before, 1)


STRATEGIES: dict[str, type[KVStrategy]] = {}


@dataclass(frozen=True)
class KVStrategy:
    """A KV-cache policy: its parameters, how many slot tokens a request needs, and the cache that applies it.

    Subclasses set `name` and `cache_class` and register themselves by name for parse_strategy().
    `engine` names the engine that runs the policy (engines/__init__.py).
    """

    name: ClassVar[str] = ""
    cache_class: ClassVar[type[SlotCache]] = SlotCache
    reserves_slots: ClassVar[bool] = True
    recomputes: ClassVar[bool] = False  # no cache: each step runs the whole sequence (strategies/none.py)
    engine: ClassVar[str] = "hf"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            STRATEGIES[cls.name] = cls

    def capacity(self, request: Request) -> int:
        return request.context_tokens

    def slot_bytes(self, model: LoadedModel, slot_tokens: int, context_tokens: int | None = None) -> int:
        """Device bytes one slot of `slot_tokens` allocates for requests of up to `context_tokens` tokens; the KV
        memory limit buys slots at this price."""
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
