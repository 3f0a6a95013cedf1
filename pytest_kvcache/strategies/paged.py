"""Paged KV cache: vLLM's memory model (block pool, block tables, admission by free blocks, preemption).

Follows Kwon et al., "Efficient Memory Management for Large Language Model Serving with PagedAttention" (SOSP 2023):
Section 4.2 (KV cache manager: fixed-size blocks from one pool, a block table per request, a new block only when
the last one is full) and Section 4.5 (when blocks run out, requests are preempted all-or-nothing, by swapping
their blocks to host memory or by recomputing them from prompt + generated tokens), scheduled as vLLM V1 does
(vllm-project/vllm `vllm/v1/core/sched/scheduler.py` `schedule()`; `vllm/v1/core/kv_cache_manager.py`
`allocate_slots` returns None when `num_blocks_to_allocate > block_pool.get_num_free_blocks()`): the engine first
gives every running request, in running-list order, the block its next token needs, preempting from the *tail* of
the running list (`self.running.pop()`) until it fits; only in a step that preempted nothing are waiting requests
admitted, each if blocks for its whole token list (prompt, or prompt + generated after a recompute preemption) are
free, minus the watermark (V0 `can_allocate`: 0.01 of the pool; V1 has none, so the default here is 0). This cache
answers `reserve` and `can_admit`; victim order is the engine's (engines/hf.py).

Preemption: `recompute` is vLLM V1's only mode; `swap` is V0 behaviour, offered so the two can be compared.

Deliberate differences:
- Attention reads the blocks in place through the block table (the paper's Section 4.1 kernel: the engine's
  split-K kernel on CUDA) or, on CPU, gathers each row's blocks into a padded view for the masked SDPA of the full
  cache (so outputs match `full` bit for bit); keys are stored after RoPE at their original positions.
- The host copy of a swapped request is a fresh pinned tensor filled on a copy stream that overlaps the step (the
  share of copy time hidden is measured: `transfer_overlap`), not a bounded CPU block pool (V0's `swap_space`);
  swapped bytes are unbounded.
- Pool size: the `blocks` parameter, or under a KV memory limit as many blocks as it buys (vLLM's
  num_gpu_blocks), or enough for every row to hold the longest request.

Counters: resident bytes are counted per token (tokens held x bytes per token, as every strategy does, so an ample
paged run reports the same counters as `full`); `peak_block_bytes` is vLLM's view, whole blocks in use at the peak
times the block size (fragmentation included). A recompute preemption frees the request's tokens without counting
them as evicted; recomputed tokens are stored again, so `tokens_stored - tokens_kept_final` counts them.
"""

from __future__ import annotations

import math
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.models import LoadedModel
from pytest_kvcache.strategies.base import AttendSpec, KVStrategy, SlotCache, Step

PREEMPT_MODES = ("recompute", "swap")


@dataclass
class SwappedKV:
    """Host copy of a preempted request: k, v are (layers, n_blocks, kv_heads, block_size, head_dim) CPU tensors."""

    k: torch.Tensor
    v: torch.Tensor
    kept: int
    seen: int
    limit: int

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


def _to_host(pool: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Copy blocks `ids` of every layer of a pool into a new host tensor (pinned on CUDA, as vLLM's swap space is;
    asynchronous there: valid once the copy stream's event has passed)."""
    shape = (pool.shape[0], ids.numel(), *pool.shape[2:])
    cuda = pool.device.type == "cuda"
    host = torch.empty(shape, dtype=pool.dtype, pin_memory=cuda)
    return host.copy_(pool[:, ids], non_blocking=cuda)


class PagedCache(SlotCache):
    """KV in a pool of fixed-size blocks; a row of the block table maps a running request's tokens to blocks.

    Shapes: k, v are (layers, num_blocks, kv_heads, block_size, head_dim); the block table (rows, max_blocks) is a
    step field (host twin edited in place, uploaded with the step); a request's token t lives in block
    table[row, t // block_size] at offset t % block_size. Rows play the engine's slots: running requests occupy
    rows 0..B-1 and `move` copies a row of the table, never KV.
    """

    def __init__(self, strategy: Paged, model: LoadedModel, n_slots: int, slot_tokens: int) -> None:
        self.block_size = strategy.block_size
        self.max_blocks = math.ceil(slot_tokens / self.block_size)
        self.num_blocks = strategy.blocks if strategy.blocks is not None else n_slots * self.max_blocks
        self.watermark_blocks = int(strategy.watermark * self.num_blocks)
        if self.num_blocks - self.max_blocks < self.watermark_blocks:
            raise KVConfigError(
                f"paged: blocks={self.num_blocks} cannot hold the longest request ({slot_tokens} tokens = "
                f"{self.max_blocks} blocks of {self.block_size}) plus the watermark ({self.watermark_blocks} blocks); "
                f"raise blocks to at least {self.max_blocks + self.watermark_blocks}"
            )
        super().__init__(strategy, model, n_slots, 0)  # no slot storage: the block pool below holds the KV
        self.slot_tokens = slot_tokens
        shape = (model.num_layers, self.num_blocks, model.num_kv_heads, self.block_size, model.head_dim)
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.v = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.block_table = self.fields.host_view("table")
        self.block_bytes = self.block_size * self.token_bytes
        self.copy_stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None

    def step_fields(self) -> dict[str, int]:
        return {"write": 1, "lengths": 1, "write_block": 1, "table": self.max_blocks}

    def reset(self) -> None:
        super().reset()
        self.row_blocks = [0] * self.n_slots
        self.free: deque[int] = deque(range(self.num_blocks))
        self.peak_used_blocks = 0
        self.swapping_out: list[tuple] = []  # (start, end event, host copy) of copies still on the copy stream
        self.swapping_in: list[tuple] = []

    def _wait(self, copies: list[tuple]) -> None:
        """The compute stream needs these copies done: it waits (timed: the stall counts against the overlap)."""
        for started, ended, _ in copies:
            self.transfers.needed(started, ended)
        copies.clear()

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def peak_block_bytes(self) -> int:
        """vLLM's KV usage at the peak: whole blocks in use times the block bytes."""
        return self.peak_used_blocks * self.block_bytes

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens."""
        return math.ceil(tokens / self.block_size)

    def _grow(self, row: int, tokens: int) -> None:
        """Append blocks from the free pool to `row` until it holds `tokens` tokens (blocks that a swap-out is still
        copying are only handed out once the copy is done)."""
        if self.row_blocks[row] < self.blocks_for(tokens):
            self._wait(self.swapping_out)
        while self.row_blocks[row] < self.blocks_for(tokens):
            self.block_table[row, self.row_blocks[row]] = self.free.popleft()
            self.row_blocks[row] += 1
        self.peak_used_blocks = max(self.peak_used_blocks, self.used_blocks)

    def _free_row(self, row: int) -> None:
        """Return a row's blocks to the pool (vLLM appends freed blocks to the free queue's tail)."""
        self.free.extend(self.block_table[row, : self.row_blocks[row]].tolist())
        self.row_blocks[row] = 0

    def _row_ids(self, row: int) -> torch.Tensor:
        """Block ids of `row` (n_blocks,) on the model's device."""
        return self.block_table[row, : self.row_blocks[row]].to(self.v.device)

    def can_admit(self, running: int, tokens: int) -> bool:
        """vLLM admits a request only if a table row is free and its tokens' blocks are, above the watermark."""
        return running < self.n_slots and len(self.free) - self.blocks_for(tokens) >= self.watermark_blocks

    def reserve(self, slot: int, tokens: int) -> bool:
        """Give the row the blocks `tokens` tokens need, if the pool has them (decode may use every free block)."""
        if self.blocks_for(tokens) - self.row_blocks[slot] > len(self.free):
            return False
        self._grow(slot, tokens)
        return True

    def release(self, slot: int) -> None:
        super().release(slot)
        self._free_row(slot)

    def move(self, src: int, dst: int) -> None:
        """Move a running request's block-table row into a freed row; its KV stays where it is."""
        self.block_table[dst] = self.block_table[src]
        self.row_blocks[dst], self.row_blocks[src] = self.row_blocks[src], 0
        self.kept[dst], self.seen[dst], self.limit[dst] = self.kept[src], self.seen[src], self.limit[src]
        self.kept[src] = 0

    def preempt(self, slot: int) -> SwappedKV | None:
        """Free all of the request's blocks (all-or-nothing); with swap, copy them to pinned host memory first, on
        the copy stream while the step computes: the compute stream waits for it only before those blocks are handed
        out again (vLLM V1 admits nothing in a step that preempted, so not before the next step)."""
        saved = None
        if self.strategy.preempt == "swap":
            ids = self._row_ids(slot)
            started = self.transfers.start(self.copy_stream)
            with _on(self.copy_stream):
                host_k, host_v = _to_host(self.k, ids), _to_host(self.v, ids)
            self.swapping_out.append((started, self.transfers.end(self.copy_stream), None))
            saved = SwappedKV(host_k, host_v, self.kept[slot], self.seen[slot], self.limit[slot])
            self.counters.bytes_to_host += saved.nbytes
        self.counters.add_resident(-self.kept[slot] * self.token_bytes)
        self.kept[slot] = 0
        self._free_row(slot)
        return saved

    def resume(self, slot: int, saved: SwappedKV) -> None:
        """Allocate fresh blocks for a swapped request and copy its host blocks into them on the copy stream."""
        self.kept[slot], self.seen[slot], self.limit[slot] = saved.kept, saved.seen, saved.limit
        self._grow(slot, saved.kept)
        ids = self._row_ids(slot)
        self._wait(self.swapping_out)  # its host copy may still be arriving
        started = self.transfers.start(self.copy_stream)
        with _on(self.copy_stream):
            self.k[:, ids] = saved.k.to(self.k.device, non_blocking=True)
            self.v[:, ids] = saved.v.to(self.v.device, non_blocking=True)
        self.swapping_in.append((started, self.transfers.end(self.copy_stream), saved))
        self.counters.bytes_to_device += saved.nbytes
        self.counters.add_resident(saved.kept * self.token_bytes)

    def store_prefill(self, layer: int, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the prompt's rotated keys and values (1, kv_heads, P, head_dim) into the row's blocks."""
        length = k.shape[2]
        self._grow(slot, length)
        ids = self._row_ids(slot)
        pad = ids.numel() * self.block_size - length
        for pool, x in ((self.k, k), (self.v, v)):
            blocks = F.pad(x[0], (0, 0, 0, pad)).view(x.shape[1], ids.numel(), self.block_size, x.shape[3])
            pool[layer, ids] = blocks.transpose(0, 1)

    def prepare(self, batch: int) -> None:
        """Write cells of the step: the engine has reserved every row's block for its next token; swapped-in rows
        must have arrived."""
        self._wait(self.swapping_in)
        super().prepare(batch)
        self.fields.set("write", [n % self.block_size for n in self.kept[:batch]])
        self.fields.set("write_block", [int(self.block_table[r, n // self.block_size]) for r, n in
                                        enumerate(self.kept[:batch])])

    def write_target(self, layer: int, step: Step) -> tuple[torch.Tensor, ...]:
        """The new token goes to offset `write` of block `write_block`."""
        batch = step.batch
        return self.k[layer], self.v[layer], self.fields["write_block"][:batch], self.fields["write"][:batch]

    def store(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step,
              written: bool = False) -> AttendSpec:
        """Write the new token into its block; attention reads the blocks through the table."""
        spec = super().store(layer, q, k, v, step, written)
        spec.block_table = self.fields["table"][: step.batch]
        return spec


def _on(stream: torch.cuda.Stream | None):
    """Run on `stream` after what the current stream has queued (a no-op context on CPU)."""
    if stream is None:
        return nullcontext()
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    return torch.cuda.stream(stream)


@dataclass(frozen=True)
class Paged(KVStrategy):
    """block_size: tokens per block (vLLM: 16); blocks: pool size (None: every row can hold the longest request);
    preempt: 'recompute' (vLLM V1) or 'swap' (V0); watermark: pool fraction admission keeps free (V0: 0.01)."""

    name = "paged"
    cache_class = PagedCache
    reserves_slots = False
    block_size: int = 16
    blocks: int | None = None
    preempt: str = "recompute"
    watermark: float = 0.0

    def __post_init__(self) -> None:
        if not _is_int(self.block_size) or not 1 <= self.block_size <= 1024:
            raise KVConfigError(f"paged: block_size must be an integer in [1, 1024], got {self.block_size!r}")
        if self.blocks is not None and (not _is_int(self.blocks) or self.blocks < 1):
            raise KVConfigError(f"paged: blocks must be an integer >= 1 (or unset for enough), got {self.blocks!r}")
        if self.preempt not in PREEMPT_MODES:
            raise KVConfigError(f"paged: preempt must be one of {', '.join(PREEMPT_MODES)}, got {self.preempt!r}")
        if not (_is_int(self.watermark) or isinstance(self.watermark, float)) or not 0 <= self.watermark < 1:
            raise KVConfigError(f"paged: watermark must be a fraction in [0, 1), got {self.watermark!r}")

    def make_cache(self, model: LoadedModel, n_slots: int, slot_tokens: int,
                   kv_limit_bytes: int | None = None) -> PagedCache:
        """Under a KV memory limit the pool gets as many blocks as the limit buys (vLLM's num_gpu_blocks)."""
        if kv_limit_bytes is None or self.blocks is not None:
            return PagedCache(self, model, n_slots, slot_tokens)
        block_bytes = self.block_size * model.kv_bytes_per_token
        return PagedCache(replace(self, blocks=max(1, kv_limit_bytes // block_bytes)), model, n_slots, slot_tokens)


def _is_int(value: object) -> bool:
    """An int that is not a bool (True would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)
