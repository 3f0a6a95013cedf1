"""H2O: heavy hitters plus recent tokens, chosen by accumulated attention.

Follows Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
(NeurIPS 2023): Algorithm 1 (the greedy H2 eviction policy), as the FMInference/H2O reference code applies it in
`h2o_hf/utils_real_drop/modify_llama.py` (`H2OKVCache_LayerWise`, the variant that really drops KV; the
`utils_hh` port only masks attention and saves no memory, FMInference/H2O issue 6):

- score: per layer and KV head, the softmax attention each cached token receives, summed over query rows and
  accumulated over steps without normalisation (`_update_hh_score`);
- prefill: full causal attention over the prompt; its column sums are the first scores; a prompt longer than the
  budget is cut at once to the `recent` newest tokens plus the top-`heavy` by score among the rest (`__call__`);
- decode: the new token attends to the kept tokens and itself (budget + 1), scores are added, then the one
  lowest-scoring token outside the recent window is evicted (equal to keeping top-`heavy` of heavy + 1);
- keys are stored after RoPE at their original positions (no re-positioning, like the full cache).

Deliberate differences, each for a reason:
- GQA (the reference is MHA only): a KV head's score is the sum of the scores of the query heads that share it.
- heavy = floor(heavy_ratio * budget) and recent = budget - heavy of each request's budget (the reference takes
  ratios of the prompt length); the default budget 0.2 with heavy_ratio 0.5 matches its 10% + 10% default.
- scores accumulate in float32 per request (the reference keeps them in fp16, summed over the batch of one);
  ties go to the lowest cell index (the reference's topk leaves them unspecified).
- the new token's K/V is written into one spare slot cell before attention so decode uses the same SDPA call as
  the full cache (exact tokens at budget 1.0); the spare cell is then moved into the evicted token's cell, so
  slots hold budget + 1 cells, which is the reference's own transient size (it concatenates, then drops one).
- prefill column sums never materialise the P x P matrix: query chunks on CPU, a two-pass Triton kernel on CUDA
  (each row's log-sum-exp, then exp(score - lse) summed by column).
- the attention weights of a decode step come from the attention pass itself: on CUDA the split-K kernel writes
  the scaled scores and each query head's log-sum-exp, and exp(score - lse) summed over the group is the score
  update (no second matmul); on CPU the engine computes them beside SDPA. Eviction is tensor work over the slot
  (masked where a slot is not full), so the step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.models import LoadedModel
from pytest_kvcache.strategies.base import (
    AttendSpec,
    AttentionScores,
    KVStrategy,
    SlotCache,
    Step,
    budget_tokens,
    parse_budget,
)
from pytest_kvcache.traces import Request


def prefill_scores(q: torch.Tensor, k: torch.Tensor, scale: float, max_elements: int = 2**26) -> torch.Tensor:
    """Causal-softmax column sums (kv_heads, P) float32 of q (q_heads, P, D) on k (kv_heads, P, D), query heads
    of a group summed per KV head. On CUDA a fused Triton kernel (pytest_kvcache/kernels.py); on CPU query rows
    go in chunks of at most `max_elements` probabilities."""
    if q.is_cuda:
        from pytest_kvcache.kernels import causal_column_sums

        return causal_column_sums(q, k, scale)
    q_heads, length, dim = q.shape
    kv_heads = k.shape[0]
    grouped = q.reshape(kv_heads, q_heads // kv_heads, length, dim) * scale
    scores = torch.zeros(kv_heads, length, dtype=torch.float32, device=q.device)
    rows = max(1, max_elements // (q_heads * length))
    for start in range(0, length, rows):
        end = min(length, start + rows)
        logits = grouped[:, :, start:end] @ k[:, None, :end].transpose(-1, -2)
        future = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu(1)
        logits[..., start:].masked_fill_(future, -math.inf)
        scores[:, :end] += torch.softmax(logits, dim=-1, dtype=torch.float32).sum(dim=(1, 2))
    return scores


def keep_heavy_recent(scores: torch.Tensor, heavy: int, recent: int) -> torch.Tensor:
    """H2O's rule on token-ordered scores (H, N): indices (H, heavy + recent) of the `recent` newest tokens and the
    `heavy` highest-scoring among the others, in token order; needs N >= heavy + recent."""
    heads, n = scores.shape
    top = scores[:, : n - recent].topk(heavy, dim=-1).indices.sort(dim=-1).values
    newest = torch.arange(n - recent, n, device=scores.device).expand(heads, recent)
    return torch.cat([top, newest], dim=-1)


class H2OCache(SlotCache):
    """Slot layout: cells [0, kept) hold each KV head's kept tokens in any order, with their accumulated score and
    original position in `score`/`pos` (layers, slots, kv_heads, slot_tokens); cell `budget` is the spare cell."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        shape = self.k.shape[:-1]
        self.score = torch.zeros(shape, dtype=torch.float32, device=self.k.device)
        self.pos = torch.zeros(shape, dtype=torch.long, device=self.k.device)
        heads = shape[2]
        self.row_start = (torch.arange(self.n_slots, device=self.k.device)[:, None] * heads
                          + torch.arange(heads, device=self.k.device)) * self.slot_tokens
        self.cells = torch.arange(self.slot_tokens, device=self.k.device)
        self.zero = torch.zeros((), device=self.k.device)

    def step_fields(self) -> dict[str, int]:
        return {"write": 1, "lengths": 1, "full": 1, "window_start": 1}

    def reset(self) -> None:
        super().reset()
        self.budget = [0] * self.n_slots
        self.recent = [0] * self.n_slots

    @property
    def allocated_bytes(self) -> int:
        """K/V slots plus the float32 score and int64 position of every cell."""
        return super().allocated_bytes + sum(t.numel() * t.element_size() for t in (self.score, self.pos))

    def admit(self, slot: int, request: Request) -> None:
        super().admit(slot, request)
        self.budget[slot] = self.strategy.tokens(request)
        self.recent[slot] = self.strategy.split(request)[1]

    def move(self, src: int, dst: int) -> None:
        n = self.kept[src]
        self.score[:, dst, :, :n] = self.score[:, src, :, :n]
        self.pos[:, dst, :, :n] = self.pos[:, src, :, :n]
        self.budget[dst], self.recent[dst] = self.budget[src], self.recent[src]
        super().move(src, dst)

    def store_prefill(self, layer: int, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep heavy + recent by the prompt's causal-attention column sums (all, if the prompt fits the budget)."""
        length = q.shape[2]
        scale = self.model.model.model.layers[layer].self_attn.scaling
        scores = prefill_scores(q[0], k[0], scale)
        budget, recent = self.budget[slot], self.recent[slot]
        if length > budget:
            keep = keep_heavy_recent(scores, budget - recent, recent)
        else:
            keep = torch.arange(length, device=q.device).expand(k.shape[1], length)
        n = keep.shape[1]
        cells = keep.unsqueeze(-1).expand(-1, -1, k.shape[-1])
        self.k[layer, slot, :, :n] = k[0].gather(1, cells)
        self.v[layer, slot, :, :n] = v[0].gather(1, cells)
        self.score[layer, slot, :, :n] = scores.gather(1, keep)
        self.pos[layer, slot, :, :n] = keep

    def kept_after_prefill(self, slot: int, prompt_tokens: int) -> int:
        return min(prompt_tokens, self.budget[slot])

    def prepare(self, batch: int) -> None:
        """The full cache's step (new token at cell `kept`: the spare cell once the budget is full), plus which
        slots are full and where their recent window starts."""
        super().prepare(batch)
        full = [int(self.kept[s] >= self.budget[s]) for s in range(batch)]
        self.fields.set("full", full)
        self.fields.set("window_start", [self.seen[s] + 1 - self.recent[s] for s in range(batch)])
        self.evicts = any(full)

    def store(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step,
              written: bool = False) -> AttendSpec:
        """Store the new token as the full cache does and ask for the attention each cell gets."""
        spec = super().store(layer, q, k, v, step, written)
        spec.want_probs = True
        self.positions = step.positions
        return spec

    def observe(self, layer: int, spec: AttendSpec, scores: AttentionScores | None) -> None:
        """Add this step's attention to the scores (the new cell starts from its own weight, at its position);
        where the budget is full, evict. From the kernel's logits: one fused launch (pytest_kvcache/kernels.py)."""
        batch, fields = spec.lengths.shape[0], self.fields
        if scores.logits is not None:
            from pytest_kvcache import kernels

            kernels.h2o_update(scores.logits, scores.lse, self.score[layer], self.pos[layer], self.k[layer],
                               self.v[layer], spec.lengths, fields["write"][:batch], fields["full"][:batch],
                               fields["window_start"][:batch], self.positions)
            return
        rows, write = self.row_index[:batch], fields["write"][:batch]
        self.score[layer, rows, :, write] = self.zero
        self.pos[layer, rows, :, write] = self.positions[:, None]
        width = scores.weights.shape[-1]
        self.score[layer, :batch, :, :width] += scores.weights
        if self.evicts:
            self._evict(layer, batch, width)

    def _evict(self, layer: int, batch: int, width: int) -> None:
        """Per full slot and KV head, move the new token's cell onto the lowest-scoring token outside the window."""
        score, pos = self.score[layer, :batch, :, :width], self.pos[layer, :batch, :, :width]
        lengths = self.fields["lengths"][:batch, None, None]
        candidate = (self.cells[:width] < lengths) & (pos < self.fields["window_start"][:batch, None, None])
        victim = torch.where(candidate, score, math.inf).argmin(dim=-1)
        new_cell = self.row_start[:batch] + self.fields["write"][:batch, None]
        full = self.fields["full"][:batch, None].bool()
        target = torch.where(full, self.row_start[:batch] + victim, new_cell).view(-1)
        source = new_cell.view(-1)
        for buffer in (self.k, self.v, self.score, self.pos):
            cells = buffer[layer].flatten(0, 2)
            cells.index_copy_(0, target, cells.index_select(0, source))

    def advance(self, batch: int) -> None:
        for slot in range(batch):
            kept_before = self.kept[slot]
            self.seen[slot] += 1
            self.kept[slot] = min(kept_before + 1, self.budget[slot])
            self._account(slot, kept_before, 1)


@dataclass(frozen=True)
class H2O(KVStrategy):
    """budget: fraction of each request's context in (0, 1] or a token count (paper: 0.2);
    heavy_ratio: fraction of the budget for heavy hitters in [0, 1], the rest is the recent window (paper: 0.5)."""

    name = "h2o"
    cache_class = H2OCache
    budget: float | int = 0.2
    heavy_ratio: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", parse_budget(self.budget))
        ratio = self.heavy_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise KVConfigError(f"h2o: heavy_ratio must be a fraction of the budget in [0, 1], got {ratio!r}")
        object.__setattr__(self, "heavy_ratio", float(ratio))

    def tokens(self, request: Request) -> int:
        """Tokens the request keeps once its budget is reached."""
        return budget_tokens(self.budget, request, minimum=2)

    def split(self, request: Request) -> tuple[int, int]:
        """(heavy, recent) token counts; floor as the reference's int(ratio * length), robust to float error."""
        tokens = self.tokens(request)
        heavy = int(self.heavy_ratio * tokens + 1e-9)
        return heavy, tokens - heavy

    def slot_bytes(self, model: LoadedModel, slot_tokens: int, context_tokens: int | None = None) -> int:
        """K/V of every cell plus its float32 score and int64 position, per layer and KV head."""
        return slot_tokens * (model.kv_bytes_per_token + model.num_layers * model.num_kv_heads * 12)

    def capacity(self, request: Request) -> int:
        """The budget plus the spare cell the incoming token occupies during a step, never more than the context."""
        return min(self.tokens(request) + 1, request.context_tokens)
