"""InfiniGen: speculative fetch of the important KV from host memory, one layer ahead.

Follows Lee et al., "InfiniGen: Efficient Generative Inference of Large Language Models with Dynamic KV Cache
Management" (OSDI 2024), Section 4 (offline skewing, prefill-time partial query/key columns, decode-time
speculation and prefetch), and the snu-comparch/InfiniGen reference code:
- skewing (`accuracy/setup/gen_llama_skewing_matrix.py`, `speedup/infinigen/infinigen/skewing_controller.py`):
  per head, the SVD Q = U S V^T of a warm-up prompt's queries gives an orthogonal A (V's columns, placed by the
  order of s_q * s_k), so (QA)(KA)^T = QK^T while a few columns of QA carry most of the magnitude.
  RoPE: Llama rotates q/k after the projection, so the reference cannot fold A into W_q/W_k as it does for OPT;
  `modeling_llama_ours.py` takes the SVD of the *rotated* warm-up q/k and applies A to rotated q/k in the
  speculation path only. We do the same: real attention never sees A and is the `full` computation.
- partial columns (`accuracy/src/modeling_llama_ours_setup.py`, the Llama path): per head the union of the
  `int(head_dim * partial_ratio)` columns with the largest sum of |QA| and those with the largest sum of |KA|
  (so between 1x and 2x that many), chosen at each request's prefill; the partial key cache (those columns of KA
  for every cached token) stays on the device.
- speculation (`kv_selection_controller.speculate_attention`): layer i's attention input (after
  input_layernorm, handed over by the engine's decoder before layer i's attention) times layer i+1's query
  weight, rotated to the
  query position, skewed and cut to the partial columns, against layer i+1's partial keys gives approximate
  logits (scaled like real ones); per head, count tokens with logit > max - alpha, average the count over
  heads, cap it at the budget (`max_num_kv`) and take that many top tokens per head. Layers 0-1 are dense
  (reference: `layer_id > 1` speculate).
- fetch (`flex_opt.py` `prefetch_cache`, `select_kv`): the whole KV lives in host memory (pinned on CUDA);
  the chosen tokens of layer i+1 are gathered into a pinned staging buffer and copied to the device on a side
  stream while layer i computes; the dense layers copy their whole KV every step, as FlexGen's `load_cache`
  does for them. On CPU the device buffers are separate CPU tensors, so the copy still happens.

Deliberate differences, and why:
- Warm-up: as the reference (the first 2048 tokens of a PG-19 book), real prose: `pytest_kvcache/data/warmup.txt`,
  which no quality metric reads, tokenized by the model's own tokenizer, run once per model and memoised. Models
  without a tokenizer (the random-weight shapes, whose "text" has no meaning) warm up on seeded random token ids.
- Budget: a fraction below 1 of each request's context, or a token count (the reference asserts budget <
  capacity = 1.0); `fetch_all=1` is the named mode that fetches every cached token (the exactness check).
- GQA (the reference models are multi-head): heads sharing one KV head share one A (SVD of their stacked
  queries), one set of partial columns (summed |QA| over the group) and one token selection (the group's max
  speculated logit), so each KV head is fetched once; with one query head per KV head this is the reference.
- The average over heads that sets how many tokens to fetch is per request (the reference averages over the
  whole batch, whose requests all have the same length in FlexGen); the chosen tokens are sorted by position so
  that fetching everything reproduces `full` bit for bit.
- The host pool is never evicted (the reference's default capacity 1.0), so no token is ever lost.

On CUDA the share of copy time hidden under compute is measured with CUDA events (`transfer_overlap`).

Counters: resident bytes are what the device holds (the partial keys of every held token, plus each step's fetched
K/V, two layers at a time); the full K/V stays in the host store (no eviction): bytes_to_host counts every stored
token's K and V, bytes_to_device exactly the K and V rows copied to the device. Under a KV memory limit a slot costs
its device footprint (InfiniGen.slot_bytes), not the full cache's. recall() reports how many of the
true top-k tokens (k = the number speculated, ranked by the real logits of layer i+1 over all cached keys) the
speculation fetched; it should become a metric.
"""

from __future__ import annotations

import math
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from importlib.resources import files

import torch

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.models import LoadedModel
from pytest_kvcache.strategies.base import AttendSpec, KVStrategy, SlotCache, Step, budget_tokens, parse_budget, rope
from pytest_kvcache.traces import Request

DENSE_LAYERS = 2
WARMUP_TOKENS = 2048
WARMUP_SEED = 0
WARMUP_TEXT = "data/warmup.txt"
_SKEW: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def skewing_matrices(q_rot: torch.Tensor, k_rot: torch.Tensor) -> torch.Tensor:
    """Orthogonal A per KV head from warm-up q (Hq, P, D) and k (Hkv, P, D), P >= D; returns (Hkv, D, D) float32.

    As gen_llama_skewing_matrix.py: A[:, ind[j]] = V_q[:, j] with ind = argsort(s_q * s_k) ascending.
    """
    kv_heads, _, dim = k_rot.shape
    queries = q_rot.float().reshape(kv_heads, -1, dim)
    _, s_q, vh_q = torch.linalg.svd(queries, full_matrices=False)
    s_k = torch.linalg.svdvals(k_rot.float())
    ind = (s_q * s_k).argsort(dim=-1)
    skew = torch.zeros(kv_heads, dim, dim, device=q_rot.device)
    return skew.scatter(-1, ind[:, None, :].expand(kv_heads, dim, dim), vh_q.mT)


def partial_columns(q_mass: torch.Tensor, k_mass: torch.Tensor, per_side: int,
                    width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's Llama partial columns: per head (rows of q_mass/k_mass (H, D), summed |QA| and |KA|), the
    union of the `per_side` largest of each. Returns column indices (H, width) with the union first (ascending) and
    a mask (H, width) of which are in it (the rest pad to a fixed width and are zeroed at speculation)."""
    heads, dim = q_mass.shape
    chosen = torch.zeros(heads, dim, dtype=torch.bool, device=q_mass.device)
    chosen.scatter_(-1, q_mass.topk(per_side, dim=-1).indices, True)
    chosen.scatter_(-1, k_mass.topk(per_side, dim=-1).indices, True)
    columns = torch.arange(dim, device=q_mass.device).expand(heads, dim)
    order = torch.where(chosen, columns, columns + dim).argsort(dim=-1)[:, :width]
    return order, chosen.gather(-1, order)


def select_tokens(scores: torch.Tensor, alpha: float, cap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfiniGen's fetch rule on speculated logits (B, H, T) (-inf where no token) with per-request caps (B,).

    Per request: n = min(int(mean over heads of #{logit > max - alpha}), cap); each head takes its top n tokens.
    Returns chosen positions (B, H, n_max), ascending, padded with T, and n (B,).
    """
    length = scores.shape[-1]
    over = (scores > scores.amax(-1, keepdim=True) - alpha).sum(-1)
    count = torch.minimum(over.float().mean(-1).long(), cap)
    widest = int(count.max())
    order = scores.topk(widest, dim=-1).indices
    valid = torch.arange(widest, device=scores.device) < count[:, None, None]
    return torch.where(valid, order, length).sort(dim=-1).values, count


class _WarmupRecorder:
    """Stands in for the cache during the warm-up prefill: keeps each layer's rotated q/k."""

    def __init__(self) -> None:
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}

    def store_prefill(self, layer: int, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.q[layer], self.k[layer] = q[0], k[0]


def warmup_ids(model: LoadedModel) -> list[int]:
    """The warm-up prompt: the shipped prose through the model's tokenizer, else seeded random ids (>= head_dim)."""
    length = min(max(WARMUP_TOKENS, model.head_dim), model.config.max_position_embeddings)
    if model.tokenizer is not None:
        text = files("pytest_kvcache").joinpath(WARMUP_TEXT).read_text()
        ids = list(model.tokenizer(text).input_ids[:length])
        if len(ids) < model.head_dim:
            raise KVConfigError(f"infinigen: {WARMUP_TEXT} gives {len(ids)} tokens, fewer than head_dim {model.head_dim}")
        return ids
    generator = torch.Generator().manual_seed(WARMUP_SEED)
    return torch.randint(model.vocab_size, (length,), generator=generator).tolist()


def skewing(model: LoadedModel, decoder) -> torch.Tensor:
    """Skewing matrices (layers, Hkv, D, D) of a model from its warm-up prompt, computed once per model; the
    decoder prefills the prompt (the engine routes the model's attention to it)."""
    if model.model not in _SKEW:
        ids = warmup_ids(model)
        recorder = _WarmupRecorder()
        decoder.prefill([0], [ids], cache=recorder)
        layers = [skewing_matrices(recorder.q[i], recorder.k[i]) for i in range(model.num_layers)]
        _SKEW[model.model] = torch.stack(layers).to(model.dtype)
    return _SKEW[model.model]


@dataclass
class _Fetch:
    """One layer's KV on the device for this step: `count` (B,) rows of `keys`/`values` (B, Hkv, >n_max, D), the
    chosen positions (B, Hkv, n_max), and the side-stream event plus index tensors kept alive until it is waited."""

    keys: torch.Tensor
    values: torch.Tensor
    chosen: torch.Tensor
    count: torch.Tensor
    event: torch.cuda.Event | None
    started: torch.cuda.Event | None
    index: tuple[torch.Tensor, ...]


class InfiniGenCache(SlotCache):
    """Host store of every token's K/V; device holds two fetch buffers and the partial key cache.

    Shapes: host_k/host_v (layers, slots, Hkv, host_tokens, D) on the host (host_tokens grows to the longest
    context admitted); k/v (2, slots, Hkv, slot_tokens, D) fetch buffers of the speculated layers on the device,
    alternating by layer parity (layer i+1 fills one while layer i reads the other); the dense layers' whole KV is
    copied into a fresh (B, Hkv, span + 1, D) tensor each step; partial_keys (sparse layers, slots, Hkv,
    host_tokens, d') and partial_index (sparse layers, slots, Hkv, d') on the device, d' = head_dim * ratio.
    A fetched layer holds a request's chosen tokens at 0..n-1 in position order and the current token at n.
    Not captured in a CUDA graph: the host gathers the chosen rows every layer.
    """

    capturable = False

    def __init__(self, strategy: InfiniGen, model: LoadedModel, n_slots: int, slot_tokens: int) -> None:
        super().__init__(strategy, model, n_slots, 0)
        self.slot_tokens = slot_tokens
        device, dtype = model.device, model.dtype
        self.kv_heads, self.head_dim = model.num_kv_heads, model.head_dim
        self.groups = model.config.num_attention_heads // self.kv_heads
        self.dense = min(DENSE_LAYERS, model.num_layers)
        self.partial = max(1, int(self.head_dim * strategy.partial_ratio))
        self.width = min(self.head_dim, 2 * self.partial)  # union of the |QA| and |KA| top columns
        self.pinned = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.pinned else None
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.k = torch.zeros((2, n_slots, self.kv_heads, slot_tokens, self.head_dim), dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.new_k = torch.zeros((model.num_layers, n_slots, self.kv_heads, self.head_dim), dtype=dtype, device=device)
        self.new_v = torch.zeros_like(self.new_k)
        index_shape = (model.num_layers - self.dense, n_slots, self.kv_heads, self.width)
        self.partial_index = torch.zeros(index_shape, dtype=torch.long, device=device)
        self.partial_valid = torch.zeros(index_shape, dtype=torch.bool, device=device)
        self.host_tokens = 0
        self._grow(0)
        self.skew: torch.Tensor | None = None
        self.attn = [layer.self_attn for layer in model.model.model.layers]

    def reset(self) -> None:
        super().reset()
        self.recall_hits = [0] * self.model.num_layers
        self.recall_total = [0] * self.model.num_layers

    @property
    def token_bytes(self) -> int:
        """Device bytes one held token costs: its partial keys in the sparse layers (its K/V live on the host and
        reach the device only when fetched, counted per step in `advance`)."""
        layers = self.model.num_layers - min(DENSE_LAYERS, self.model.num_layers)
        return layers * self.model.num_kv_heads * self.width * (torch.finfo(self.model.dtype).bits // 8)

    def setup(self, decoder) -> None:
        """Skewing matrices from the warm-up prompt (run once per model through the engine's decoder)."""
        self.skew = skewing(self.model, decoder)
    @property
    def allocated_bytes(self) -> int:
        """Device bytes: the two fetch buffers, the partial key cache and its column index (host store excluded)."""
        tensors = (self.k, self.v, self.partial_keys, self.partial_index, self.partial_valid, self.new_k, self.new_v)
        return sum(t.numel() * t.element_size() for t in tensors)

    def recall(self, layer: int | None = None) -> float:
        """Fraction of the true top-k tokens that speculation fetched (over all sparse layers, or one); nan if none."""
        hits = sum(self.recall_hits) if layer is None else self.recall_hits[layer]
        total = sum(self.recall_total) if layer is None else self.recall_total[layer]
        return hits / total if total else math.nan

    def _grow(self, tokens: int) -> None:
        """Reallocate the host store, staging buffers and partial keys for `tokens` per slot, keeping contents."""
        old = self.host_tokens
        shape = (self.model.num_layers, self.n_slots, self.kv_heads, tokens, self.head_dim)
        host_k = torch.zeros(shape, dtype=self.model.dtype, pin_memory=self.pinned)
        host_v = torch.zeros(shape, dtype=self.model.dtype, pin_memory=self.pinned)
        partial_keys = torch.zeros((shape[0] - self.dense, *shape[1:4], self.width), dtype=self.model.dtype,
                                   device=self.model.device)
        if old:
            host_k[..., :old, :] = self.host_k
            host_v[..., :old, :] = self.host_v
            partial_keys[..., :old, :] = self.partial_keys
        self.host_k, self.host_v, self.partial_keys = host_k, host_v, partial_keys
        rows = self.n_slots * self.kv_heads * tokens
        self.staging = torch.empty((2, 2, rows, self.head_dim), dtype=self.model.dtype, pin_memory=self.pinned)
        self.host_tokens = tokens

    def admit(self, slot: int, request: Request) -> None:
        super().admit(slot, request)
        if request.context_tokens > self.host_tokens:
            for event in filter(None, self.events):
                event.synchronize()
            self._grow(request.context_tokens)

    def move(self, src: int, dst: int) -> None:
        n = self.kept[src]
        self.host_k[:, dst, :, :n] = self.host_k[:, src, :, :n]
        self.host_v[:, dst, :, :n] = self.host_v[:, src, :, :n]
        self.partial_keys[:, dst, :, :n] = self.partial_keys[:, src, :, :n]
        self.partial_index[:, dst] = self.partial_index[:, src]
        self.partial_valid[:, dst] = self.partial_valid[:, src]
        self.kept[dst], self.seen[dst], self.limit[dst] = self.kept[src], self.seen[src], self.limit[src]
        self.kept[src] = 0

    def store_prefill(self, layer: int, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """K/V go to the host; for the sparse layers the partial columns and partial keys are set."""
        length = q.shape[2]
        self.host_k[layer, slot, :, :length] = k[0].cpu()
        self.host_v[layer, slot, :, :length] = v[0].cpu()
        if layer >= self.dense:
            sparse, skew = layer - self.dense, self.skew[layer]
            skewed_q = q[0].reshape(self.kv_heads, self.groups, length, self.head_dim) @ skew[:, None]
            skewed_k = k[0] @ skew
            index, valid = partial_columns(skewed_q.abs().sum(dim=(1, 2)), skewed_k.abs().sum(dim=1), self.partial,
                                           self.width)
            self.partial_index[sparse, slot], self.partial_valid[sparse, slot] = index, valid
            self.partial_keys[sparse, slot, :, :length] = skewed_k.gather(-1, index[:, None].expand(-1, length, -1))

    def finish_prefill(self, slot: int, prompt_tokens: int) -> None:
        super().finish_prefill(slot, prompt_tokens)
        self.counters.bytes_to_host += prompt_tokens * self.model.kv_bytes_per_token

    def prepare(self, batch: int) -> None:
        """Step state, then the dense layers' whole KV is fetched (sparse layers are fetched as speculated)."""
        device = self.v.device
        kept = torch.tensor(self.kept[:batch], device=device)
        cap = torch.tensor(self.limit[:batch], device=device) - 1
        span = max(self.kept[:batch])
        cells = torch.arange(span, device=device)
        everything = torch.where(cells < kept[:, None], cells, span)[:, None].expand(batch, self.kv_heads, span)
        self.fetched: dict[int, _Fetch] = {}
        self.kept_now, self.cap, self.everything = kept, cap, everything
        self.read_rows = self.widest_fetch = 0
        for layer in range(self.dense):
            keys = torch.zeros((batch, self.kv_heads, span + 1, self.head_dim), dtype=self.v.dtype, device=device)
            self.fetched[layer] = self._fetch(layer, everything, kept, keys, torch.zeros_like(keys))

    def step_kv_bytes(self, batch: int) -> int:
        """The rows fetched to the device this step, plus the partial keys speculation read."""
        partial = self.partial_keys[:, :batch].numel() * self.partial_keys.element_size()
        return self.read_rows * 2 * self.head_dim * self.v.element_size() + partial

    def before_attention(self, layer: int, hidden: torch.Tensor, step: Step) -> None:
        """Speculate layer+1's important tokens from this layer's normed input and start fetching them."""
        if self.dense <= layer + 1 < self.model.num_layers:
            self.fetched[layer + 1] = self._speculate(layer + 1, hidden, step)

    def _speculate(self, layer: int, hidden: torch.Tensor, step: Step) -> _Fetch:
        """Approximate logits of `layer` from the previous layer's normed input (B, hidden); fetch the chosen
        (everything with fetch_all)."""
        attn, batch, sparse = self.attn[layer], step.batch, layer - self.dense
        parity = layer % 2
        if self.strategy.fetch_all:
            return self._fetch(layer, self.everything, self.kept_now, self.k[parity], self.v[parity])
        q = attn.q_proj(hidden).view(batch, -1, 1, self.head_dim)
        q_rot = rope(q, step.cos, step.sin).reshape(batch, self.kv_heads, self.groups, self.head_dim)
        index = self.partial_index[sparse, :batch, :, None].expand(-1, -1, self.groups, -1)
        valid = self.partial_valid[sparse, :batch, :, None]
        partial_q = (q_rot @ self.skew[layer]).gather(-1, index) * valid
        span = max(self.kept[:batch])
        keys = self.partial_keys[sparse, :batch, :, :span]
        scores = ((partial_q @ keys.mT) * attn.scaling).amax(dim=2)
        absent = torch.arange(span, device=scores.device) >= self.kept_now[:, None, None]
        chosen, count = select_tokens(scores.masked_fill(absent, -math.inf), self.strategy.alpha, self.cap)
        return self._fetch(layer, chosen, count, self.k[parity], self.v[parity])

    def _fetch(self, layer: int, chosen: torch.Tensor, count: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor) -> _Fetch:
        """Gather the chosen host rows (B, Hkv, n_max) of `layer` into pinned staging, copy them to the device
        (side stream on CUDA) and place them at positions 0..count-1 of keys/values (B, Hkv, >n_max, D)."""
        batch, heads, widest = chosen.shape
        valid = (torch.arange(widest, device=chosen.device) < count[:, None, None]).expand_as(chosen)
        rows = torch.arange(batch, device=chosen.device)[:, None, None].expand_as(chosen)[valid]
        head = torch.arange(heads, device=chosen.device)[None, :, None].expand_as(chosen)[valid]
        cell = torch.arange(widest, device=chosen.device).expand_as(chosen)[valid]
        flat = ((rows * heads + head) * self.host_tokens + chosen[valid]).cpu()
        n, parity = flat.numel(), layer % 2
        if self.events[parity] is not None:
            self.events[parity].synchronize()
        torch.index_select(self.host_k[layer].view(-1, self.head_dim), 0, flat, out=self.staging[parity, 0, :n])
        torch.index_select(self.host_v[layer].view(-1, self.head_dim), 0, flat, out=self.staging[parity, 1, :n])
        self.counters.bytes_to_device += 2 * n * self.head_dim * self.staging.element_size()
        self.read_rows += n
        self.widest_fetch = max(self.widest_fetch, n)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(keys.device))
        started = self.transfers.start(self.stream)
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            packed = torch.empty((2, n, self.head_dim), dtype=keys.dtype, device=keys.device)
            packed[0].copy_(self.staging[parity, 0, :n], non_blocking=True)
            packed[1].copy_(self.staging[parity, 1, :n], non_blocking=True)
            keys[rows, head, cell] = packed[0]
            values[rows, head, cell] = packed[1]
        event = self.transfers.end(self.stream)
        self.events[parity] = event
        return _Fetch(keys, values, chosen, count, event, started, (rows, head, cell))

    def write_target(self, layer: int, step: Step) -> None:
        return None

    def store(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step,
              written: bool = False) -> AttendSpec:
        """Attention over the fetched tokens plus the current one (at position count), in position order."""
        fetched = self.fetched.pop(layer)
        self.transfers.needed(fetched.started, fetched.event)
        batch = step.batch
        rows = torch.arange(batch, device=q.device)
        fetched.keys[rows, :, fetched.count] = k
        fetched.values[rows, :, fetched.count] = v
        self.new_k[layer, :batch] = k
        self.new_v[layer, :batch] = v
        if layer >= self.dense:
            sparse = layer - self.dense
            skewed = (k[:, :, None] @ self.skew[layer])[:, :, 0]
            partial_k = skewed.gather(-1, self.partial_index[sparse, :batch])
            self.partial_keys[sparse, rows, :, self.kept_now] = partial_k
            if self.strategy.track_recall:
                self._measure_recall(layer, q, fetched)
        span = fetched.chosen.shape[-1] + 1
        return AttendSpec(fetched.keys[:batch, :, :span], fetched.values[:batch, :, :span], fetched.count + 1,
                          int(fetched.count.max()) + 1)

    def _measure_recall(self, layer: int, q_rot: torch.Tensor, fetched: _Fetch) -> None:
        """Count fetched tokens among the true top-n (n = count) by layer's real logits over all host keys."""
        batch = q_rot.shape[0]
        span = max(self.kept[:batch])
        keys = self.host_k[layer, :batch, :, :span].float()
        query = q_rot.float().cpu().reshape(batch, self.kv_heads, self.groups, self.head_dim)
        true = (query @ keys.mT).amax(dim=2)
        kept = torch.tensor(self.kept[:batch])
        true.masked_fill_(torch.arange(span) >= kept[:, None, None], -math.inf)
        chosen, count = fetched.chosen.cpu(), fetched.count.cpu()
        top = true.topk(chosen.shape[-1], dim=-1).indices
        member = torch.zeros((batch, self.kv_heads, span + 1), dtype=torch.bool).scatter_(-1, chosen, True)
        valid = torch.arange(chosen.shape[-1]) < count[:, None, None]
        self.recall_hits[layer] += int((member.gather(-1, top) & valid).sum())
        self.recall_total[layer] += int(count.sum()) * self.kv_heads

    def advance(self, batch: int) -> None:
        """Write this step's new K/V of every layer to the host store (one copy), then count the token; the step's
        fetched K/V were on the device too, two layers' worth at a time (double buffering)."""
        write = torch.tensor(self.kept[:batch])
        rows = torch.arange(batch)
        self.host_k[:, rows, :, write] = self.new_k[:, :batch].cpu().transpose(0, 1)
        self.host_v[:, rows, :, write] = self.new_v[:, :batch].cpu().transpose(0, 1)
        self.counters.bytes_to_host += batch * self.model.kv_bytes_per_token
        in_flight = 2 * self.widest_fetch * 2 * self.head_dim * self.v.element_size()
        self.counters.add_resident(in_flight)
        self.counters.add_resident(-in_flight)
        super().advance(batch)


@dataclass(frozen=True)
class InfiniGen(KVStrategy):
    """budget: most tokens fetched per layer (reference `max_num_kv`/`budget`), a fraction below 1 of each request's
    context or a token count; alpha: fetch tokens with speculated logit > max - alpha (paper: 4 OPT, 5 Llama-2);
    partial_ratio: share of head_dim columns per side (|QA| and |KA|) used to speculate, in (0, 1] (paper 0.2);
    track_recall: 1 measures the speculation's recall against the true top-k every step (costs a full-key pass on
    the host), 0 skips it; fetch_all: 1 fetches every cached token every step (the budget is then unused)."""

    name = "infinigen"
    cache_class = InfiniGenCache
    budget: float | int = 0.2
    alpha: float = 5.0
    partial_ratio: float = 0.2
    track_recall: int = 1
    fetch_all: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", parse_budget(self.budget))
        if self.budget == 1.0 and isinstance(self.budget, float):
            raise KVConfigError("infinigen: budget must be below 1 of the context (the reference asserts budget < "
                                "capacity); to fetch every cached token use infinigen:fetch_all=1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise KVConfigError(f"infinigen: alpha must be a finite number > 0 (4 OPT, 5 Llama-2), got {self.alpha!r}")
        ratio = self.partial_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise KVConfigError(f"infinigen: partial_ratio must be in (0, 1] (paper: 0.2), got {ratio!r}")
        if self.track_recall not in (0, 1):
            raise KVConfigError(f"infinigen: track_recall must be 0 or 1, got {self.track_recall!r}")
        if self.fetch_all not in (0, 1):
            raise KVConfigError(f"infinigen: fetch_all must be 0 or 1, got {self.fetch_all!r}")

    def capacity(self, request: Request) -> int:
        """Device fetch-buffer tokens: the budget plus the current token (every token with fetch_all), never more
        than the context."""
        if self.fetch_all:
            return request.context_tokens
        return min(budget_tokens(self.budget, request) + 1, request.context_tokens)

    def slot_bytes(self, model: LoadedModel, slot_tokens: int, context_tokens: int | None = None) -> int:
        """What one request keeps on the device (the host store is not device memory): two fetch buffers of
        `slot_tokens` cells (one layer each), the partial keys of every token of the sparse layers, the dense
        layers' K/V fetched each step, and the new token's K/V of every layer."""
        context = context_tokens or slot_tokens
        elem = torch.finfo(model.dtype).bits // 8
        heads, dim, layers = model.num_kv_heads, model.head_dim, model.num_layers
        dense = min(DENSE_LAYERS, layers)
        width = min(dim, 2 * max(1, int(dim * self.partial_ratio)))
        fetch = 2 * slot_tokens * heads * dim * 2 * elem
        partial = (layers - dense) * context * heads * width * elem + (layers - dense) * heads * width * 9
        return fetch + partial + dense * context * heads * dim * 2 * elem + layers * heads * dim * 2 * elem
