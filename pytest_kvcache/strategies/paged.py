"""Paged KV cache: vLLM's memory model (block pool, block tables, admission by free blocks, preemption).

Follows Kwon et al., "Efficient Memory Management for Large Language Model Serving with PagedAttention" (SOSP 2023):
Section 4.2 (KV cache manager: fixed-size blocks from one pool, a block table per request, a new block only when
the last one is full), Section 4.5 (FCFS scheduling; when blocks run out the latest-arrived requests are preempted
all-or-nothing, by swapping their blocks to host memory or by recomputing them from prompt + generated tokens).
Reference code, vllm-project/vllm: `vllm/v1/core/kv_cache_manager.py` (`allocate_slots` returns None when
`num_blocks_to_allocate > block_pool.get_num_free_blocks()`), `vllm/v1/core/sched/scheduler.py` (`schedule()`
preempts `self.running.pop()` by recompute, `num_computed_tokens = 0`, and prepends it to the waiting queue; a waiting
request is admitted only if its blocks can be allocated), `vllm/core/block_manager.py` (V0
`SelfAttnBlockSpaceManager.can_allocate` / `can_swap_in` keep `watermark_blocks = int(watermark * num_gpu_blocks)`
free; `can_append_slots` lets decode use every free block; `swap_out` / `swap_in` move whole blocks).

Preemption: `recompute` is vLLM V1's only mode; `swap` is V0 behaviour, offered so the two can be compared.
Admission: blocks for the whole token list of a waiting request (its prompt, or prompt + generated tokens after a
recompute preemption) must be free, minus the watermark (V0: 0.01; V1 has none, so the default here is 0).

Deliberate differences:
- Decode attention gathers each request's blocks into a padded (B, kv_heads, L, head_dim) view and runs the same
  masked SDPA as the full cache (so outputs match `full` bit for bit) instead of a kernel that reads blocks in place
  (the paper's Eq. 4 kernel); keys are stored after RoPE at their original positions, like the full cache.
- The host copy of a swapped request is a fresh CPU tensor (pinned on CUDA), not a bounded CPU block pool
  (V0's `swap_space`); swapped bytes are unbounded.
- Pool size: the engine sizes storage as whole-request slots and does not pass its KV limit to the strategy, so the
  pool is the `blocks` parameter (default: enough blocks for every block-table row to hold the longest request).

Counters: resident bytes are counted per token (tokens held x bytes per token, as every strategy does, so an ample
paged run reports the same counters as `full`); vLLM's KV usage is per block: `used_blocks` / `peak_used_blocks`
times `block_bytes` give it. A recompute preemption frees the request's tokens without counting them as evicted;
recomputed tokens are stored again, so `tokens_stored - tokens_kept_final` is the number of recomputed tokens.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import replace, dataclass

import torch
import torch.nn.functional as F

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.models import LoadedModel
from pytest_kvcache.strategies.base import DecodeStep, KVStrategy, SlotCache, rope
from pytest_kvcache.traces import Request

PREEMPT_MODES = ("recompute", "swap")


@dataclass
class SwappedKV:
    """Host copy of a preempted request: k, v are (layers, n_blocks, kv_heads, block_size, head_dim) CPU tensors."""

    k: torch.Tensor
    v: torch.Tensor
    kept: int
    seen: int
    limit: int
    arrival_s: float

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


def _to_host(pool: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Copy blocks `ids` of every layer of a pool into a new host tensor (pinned on CUDA, as vLLM's swap space is)."""
    shape = (pool.shape[0], ids.numel(), *pool.shape[2:])
    host = torch.empty(shape, dtype=pool.dtype, pin_memory=pool.device.type == "cuda")
    return host.copy_(pool[:, ids])


class PagedCache(SlotCache):
    """KV in a pool of fixed-size blocks; a row of the block table maps a running request's tokens to blocks.

    Shapes: k, v are (layers, num_blocks, kv_heads, block_size, head_dim); block_table is (rows, max_blocks) int64
    on the host (copied to the device once per step, like vLLM's); a request's token t lives in block
    block_table[row, t // block_size] at offset t % block_size. Rows play the engine's slots: running requests
    occupy rows 0..B-1 and `move` copies a row of the table, never KV.
    """

    def __init__(self, strategy: Paged, model: LoadedModel, n_slots: int, slot_tokens: int) -> None:
        super().__init__(strategy, model, n_slots, 0)  # no slot storage: the block pool below holds the KV
        self.slot_tokens = slot_tokens
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
        shape = (model.num_layers, self.num_blocks, model.num_kv_heads, self.block_size, model.head_dim)
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.v = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.block_table = torch.zeros((n_slots, self.max_blocks), dtype=torch.long)
        self.row_blocks = [0] * n_slots
        self.arrival = [0.0] * n_slots
        self.free: deque[int] = deque(range(self.num_blocks))
        self.block_bytes = self.block_size * self.token_bytes
        self.peak_used_blocks = 0

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens."""
        return math.ceil(tokens / self.block_size)

    def _grow(self, row: int, tokens: int) -> None:
        """Append blocks from the free pool to `row` until it holds `tokens` tokens."""
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

    def make_room(self, batch: int) -> int:
        """How many latest-arrived requests must go so that every row of the step can get the block it needs.

        Mirrors the engine's victim choice (latest arrival, then highest row; the last row fills the victim's).
        """
        rows = list(range(batch))
        need = [max(0, self.blocks_for(self.kept[r] + 1) - self.row_blocks[r]) for r in range(batch)]
        free, count = len(self.free), 0
        while sum(need[r] for r in rows) > free:
            victim = max(range(len(rows)), key=lambda i: (self.arrival[rows[i]], i))
            free += self.row_blocks[rows[victim]]
            rows[victim] = rows[-1]
            rows.pop()
            count += 1
        return count

    def admit(self, slot: int, request: Request) -> None:
        super().admit(slot, request)
        self.arrival[slot] = request.arrival_s

    def release(self, slot: int) -> None:
        super().release(slot)
        self._free_row(slot)

    def move(self, src: int, dst: int) -> None:
        """Move a running request's block-table row into a freed row; its KV stays where it is."""
        self.block_table[dst] = self.block_table[src]
        self.row_blocks[dst], self.row_blocks[src] = self.row_blocks[src], 0
        self.kept[dst], self.seen[dst], self.limit[dst] = self.kept[src], self.seen[src], self.limit[src]
        self.arrival[dst] = self.arrival[src]
        self.kept[src] = 0

    def preempt(self, slot: int) -> SwappedKV | None:
        """Free all of the request's blocks (all-or-nothing); with swap, copy them to host memory first."""
        saved = None
        if self.strategy.preempt == "swap":
            ids = self._row_ids(slot)
            host_k, host_v = _to_host(self.k, ids), _to_host(self.v, ids)
            saved = SwappedKV(host_k, host_v, self.kept[slot], self.seen[slot], self.limit[slot], self.arrival[slot])
            self.counters.bytes_to_host += saved.nbytes
        self.counters.add_resident(-self.kept[slot] * self.token_bytes)
        self.kept[slot] = 0
        self._free_row(slot)
        return saved

    def resume(self, slot: int, saved: SwappedKV) -> None:
        """Allocate fresh blocks for a swapped request and copy its host blocks into them."""
        self.kept[slot], self.seen[slot], self.limit[slot] = saved.kept, saved.seen, saved.limit
        self.arrival[slot] = saved.arrival_s
        self._grow(slot, saved.kept)
        ids = self._row_ids(slot)
        self.k[:, ids] = saved.k.to(self.k.device, non_blocking=True)
        self.v[:, ids] = saved.v.to(self.v.device, non_blocking=True)
        self.counters.bytes_to_device += saved.nbytes
        self.counters.add_resident(saved.kept * self.token_bytes)

    def store_prefill(self, layer: int, slot: int, k: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor) -> None:
        """Write the prompt's rotated keys and values (1, kv_heads, P, head_dim) into the row's blocks."""
        length = k.shape[2]
        self._grow(slot, length)
        ids = self._row_ids(slot)
        pad = ids.numel() * self.block_size - length
        for pool, x in ((self.k, k_rot), (self.v, v)):
            blocks = F.pad(x[0], (0, 0, 0, pad)).view(x.shape[1], ids.numel(), self.block_size, x.shape[3])
            pool[layer, ids] = blocks.transpose(0, 1)

    def begin_decode(self, batch: int) -> None:
        """Give every row a block for its next token, then the write cells, gather table and mask of the step."""
        for row in range(batch):
            self._grow(row, self.kept[row] + 1)
        device = self.v.device
        kept = torch.tensor(self.kept[:batch])
        span = int(kept.max()) + 1
        table = self.block_table[:batch, : self.blocks_for(span)]
        write_block = table.gather(1, (kept // self.block_size).unsqueeze(1)).squeeze(1)
        cos, sin = self.angles(torch.tensor(self.seen[:batch], device=device).unsqueeze(1))
        valid = torch.arange(span, device=device).unsqueeze(0) <= kept.to(device).unsqueeze(1)
        offset = (kept % self.block_size).to(device)
        self.step = DecodeStep(batch, offset, cos, sin, valid[:, None, None, :], span, {})
        self.step.extra.update(table=table.to(device), write_block=write_block.to(device))

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Write the new token into its block, gather each row's blocks into (B, kv_heads, span, head_dim), attend."""
        step = self.step
        table, write_block = step.extra["table"], step.extra["write_block"]
        q_rot, k_rot = rope(q, step.query_cos, step.query_sin), rope(k, step.query_cos, step.query_sin)
        self.k[layer, write_block, :, step.write_index] = k_rot[:, :, 0]
        self.v[layer, write_block, :, step.write_index] = v[:, :, 0]
        batch, n_blocks = table.shape
        heads, dim = self.k.shape[2], self.k.shape[4]
        keys = self.k[layer][table].transpose(1, 2).reshape(batch, heads, n_blocks * self.block_size, dim)
        values = self.v[layer][table].transpose(1, 2).reshape(batch, heads, n_blocks * self.block_size, dim)
        keys, values = keys[:, :, : step.span], values[:, :, : step.span]
        return F.scaled_dot_product_attention(q_rot, keys, values, attn_mask=step.mask, scale=scale, enable_gqa=True)


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
