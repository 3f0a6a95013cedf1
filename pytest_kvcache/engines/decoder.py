"""The model forward of the hf engine: batched prefill through transformers, and the decode step.

Prefill runs the transformers model itself (its embeddings, RoPE at the real positions, norms, MLPs), with
attention routed to `prefill_attention`: full causal SDPA over each prompt, then the policy stores what it keeps.

Decode is one step of our own over the same modules and weights, so that on CUDA it can be shape-stable and
captured: RoPE once (the model's rotary embedding at each row's position), the policy's store, the engine's
attention over the policy's AttendSpec, one CUDA graph per batch size. On CPU the step calls the transformers
modules exactly as transformers does (tests compare it with `generate`); on CUDA it runs fused weights (q/k/v and
gate/up concatenated, the modules' parameters re-pointed at views of them, so no memory is doubled) and Triton
kernels for add + RMSNorm, RoPE and SiLU (pytest_kvcache/kernels.py): about a dozen launches per layer instead of ~35.
At batch <= 16 the o and down projections run as split-K GEMMs whose partials the next add + RMSNorm sums
(pytest_kvcache/split_k.py), where measured faster than cuBLAS.
The host work per step is one upload of the step fields and reading the new tokens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from pytest_kvcache.models import LoadedModel
from pytest_kvcache.strategies.base import HostStaged, SlotCache, Step, rope

ATTENTION_NAME = "pytest_kvcache"


@dataclass
class PrefillBatch:
    """What the attention function needs during one prefill: the cache, each prompt's slot and length."""

    cache: object
    slots: list[int]
    lengths: list[int]


def prefill_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, kv_step=None, **kwargs):
    """transformers attention function: causal attention over right-padded prompts (padding is in every real
    token's future, so it changes nothing), then each prompt's rotated q/k and v go to the policy."""
    batch: PrefillBatch = kv_step
    with _prefill_kernels(query.device):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    for n, (slot, length) in enumerate(zip(batch.slots, batch.lengths)):
        batch.cache.store_prefill(module.layer_idx, slot, query[n : n + 1, :, :length], key[n : n + 1, :, :length],
                                  value[n : n + 1, :, :length])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, prefill_attention)


def _prefill_kernels(device: torch.device):
    """On CUDA, flash/efficient SDPA for prefill (cuDNN's planner is slow to build a plan per shape)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@torch.inference_mode()
def prefill(model: LoadedModel, cache: object, slots: list[int], prompts: list[list[int]],
            all_logits: bool = False) -> torch.Tensor:
    """Prefill prompts into their slots of `cache` in one batch (right-padded), through the transformers model with
    attention routed to prefill_attention (the caller routes it); logits (N, V) of each prompt's last token, or
    (N, P, V) of every position with all_logits."""
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    device = model.device
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    for n, prompt in enumerate(prompts):
        ids[n, : len(prompt)] = torch.tensor(prompt)
    ids = ids.to(device)
    positions = torch.arange(width, device=device).expand(len(prompts), width)
    batch = PrefillBatch(cache, slots, lengths)
    hidden = model.model.model(input_ids=ids, position_ids=positions, use_cache=False, kv_step=batch).last_hidden_state
    if all_logits:
        return model.model.lm_head(hidden)
    last = hidden[torch.arange(len(prompts), device=device), torch.tensor(lengths, device=device) - 1]
    return model.model.lm_head(last)


@dataclass
class PrefillRecord:
    """One prompt's prefill, run once: each layer's rotated q, k and v (1, H, P, D) and the last token's logits (V,).
    Every policy prefills with full attention, so a policy's cache can be filled from the record instead of running
    the model again (the quality suites evaluate many policies on each long prompt)."""

    tokens: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    logits: torch.Tensor


class _Recorder:
    """Stands in for a cache during a prefill and keeps what each layer hands over."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def store_prefill(self, layer: int, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.layers[layer] = (q, k, v)


def record_prefill(model: LoadedModel, prompt: list[int]) -> PrefillRecord:
    """Run one prompt's prefill and keep it (memory: P x (Hq + 2 Hkv) x D per layer)."""
    recorder = _Recorder()
    with routed_attention(model):
        logits = prefill(model, recorder, [0], [list(prompt)])[0]
    return PrefillRecord(tuple(prompt), [recorder.layers[i] for i in range(model.num_layers)], logits)


@contextlib.contextmanager
def routed_attention(model: LoadedModel):
    """Route the model's attention through prefill_attention for the duration of a run, then restore it."""
    previous = model.config._attn_implementation
    model.model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.model.set_attn_implementation(previous)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax(logits, -1) of (B, V) logits: on CUDA in two levels (the maximum of each of ~V/768 pieces, then of
    the pieces), since one reduction per row over a 128k vocabulary takes ~36 us on an H200 whatever the batch;
    each level returns the first maximal index, so the result is argmax's own, ties included."""
    rows, vocab = logits.shape
    piece = next((p for p in (768, 1024, 512, 384, 256) if vocab % p == 0 and vocab > 4 * p), 0)
    if not logits.is_cuda or not piece:
        return logits.argmax(dim=-1)
    values, inner = logits.view(rows, vocab // piece, piece).max(dim=-1)
    which = values.argmax(dim=-1, keepdim=True)
    return (which * piece + inner.gather(1, which)).squeeze(1)


@dataclass
class FusedLayer:
    """One layer's decode weights on CUDA: views that the transformers modules share."""

    qkv: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    norm_in: torch.Tensor
    norm_post: torch.Tensor


def fuse_weights(model: LoadedModel) -> list[FusedLayer]:
    """Concatenate each layer's q/k/v and gate/up weights once per model and re-point the modules' parameters at
    views of them (same values, same memory), so prefill through transformers and the fused step share weights."""
    fused = getattr(model, "_fused_layers", None)
    if fused is not None:
        return fused
    fused = []
    for layer in model.model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if any(m.bias is not None for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
            raise NotImplementedError("fused decode supports Llama attention without biases")
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        rows = [attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0], attn.v_proj.weight.shape[0]]
        for module, view in zip((attn.q_proj, attn.k_proj, attn.v_proj), qkv.split(rows)):
            module.weight.data = view
        half = mlp.gate_proj.weight.shape[0]
        mlp.gate_proj.weight.data, mlp.up_proj.weight.data = gate_up[:half], gate_up[half:]
        fused.append(FusedLayer(qkv, attn.o_proj.weight, gate_up, mlp.down_proj.weight,
                                layer.input_layernorm.weight, layer.post_attention_layernorm.weight))
    model._fused_layers = fused
    return fused


class Decoder:
    """Prefill and decode for one cache of `rows` slots; on CUDA with a capturable policy, one graph per batch size.

    kernels: fused weights + Triton kernels for the step (default: on CUDA; on CPU only under TRITON_INTERPRET=1,
    which the tests use to check the kernels against the module path)."""

    def __init__(self, model: LoadedModel, cache: SlotCache, kernels: bool | None = None) -> None:
        self.model = model
        self.cache = cache
        self.hf = model.model
        self.layers = list(model.model.model.layers)
        config = model.config
        self.q_heads, self.kv_heads, self.head_dim = config.num_attention_heads, model.num_kv_heads, model.head_dim
        self.scale = self.layers[0].self_attn.scaling
        self.eps = self.layers[0].input_layernorm.variance_epsilon
        self.fused = model.device.type == "cuda" if kernels is None else kernels
        self.weights = fuse_weights(model) if self.fused else None
        # each layer's o and down weights, as split_k.choose times them together (lists built once, not per step)
        self.projections = {name: [getattr(w, name) for w in self.weights or []] for name in ("o", "down")}
        self.inputs = HostStaged(model.device, cache.n_slots, tokens=1, positions=1)
        self.attention = None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.step_times: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []

    # ---------------------------------------------------------------- prefill

    def prefill(self, slots: list[int], prompts: list[list[int]], all_logits: bool = False,
                cache: object | None = None) -> torch.Tensor:
        """Prefill prompts into their slots (see `prefill`); `cache` replaces the engine's (InfiniGen's warm-up)."""
        return prefill(self.model, cache if cache is not None else self.cache, slots, prompts, all_logits)

    # ---------------------------------------------------------------- decode

    @torch.inference_mode()
    def decode(self, batch: int, tokens: list[int], logits: bool = False) -> torch.Tensor:
        """One decode step of slots 0..batch-1 fed `tokens`: the next greedy tokens (batch,), or the logits (batch,
        V) with logits=True (never from a graph). The cache is prepared before and advanced after."""
        cache = self.cache
        cache.prepare(batch)
        self.inputs.set("tokens", tokens)
        self.inputs.set("positions", cache.seen[:batch])
        self.inputs.upload()
        cache.fields.upload()
        timed = self.model.device.type == "cuda"
        if timed:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        graph = None if logits else self.graphs.get(batch)
        if graph is not None:
            graph[0].replay()
            out = graph[1]
        else:
            out = self._step(batch)
            if not logits:
                out = greedy(out)
        if timed:
            end.record()
            self.step_times.append((start, end, cache.step_kv_bytes(batch)))
        cache.advance(batch)
        return out

    def capture(self, max_batch: int) -> None:
        """Capture the step for every batch size 1..max_batch (warm-up first: Triton compiles, cuBLAS plans)."""
        if not (self.model.device.type == "cuda" and self.fused and self.cache.capturable):
            return
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode():
            self.cache.prepare(max_batch)
            self.cache.fields.upload()
            self.inputs.upload()
            with torch.cuda.stream(stream):
                for batch in range(1, max_batch + 1):
                    self._step(batch)
            torch.cuda.current_stream().wait_stream(stream)
            for batch in range(1, max_batch + 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = greedy(self._step(batch))
                self.graphs[batch] = (graph, out)
        torch.cuda.synchronize()

    def _step(self, batch: int) -> torch.Tensor:
        """Logits (batch, V) of one decode step from the staged inputs (static shapes: safe to capture)."""
        ids = self.inputs["tokens"][:batch]
        positions = self.inputs["positions"][:batch]
        x = self.hf.model.embed_tokens(ids)
        cos, sin = self.hf.model.rotary_emb(x, positions[:, None])
        step = Step(batch, positions, cos, sin)
        self.cache.begin_step(step)
        if self.fused:
            return self._fused_layers(x, step)
        return self._module_layers(x, step)

    def _attend(self, layer: int, hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                step: Step, written: bool = False) -> torch.Tensor:
        cache = self.cache
        cache.before_attention(layer, hidden, step)
        spec = cache.store(layer, q, k, v, step, written)
        if self.fused and (self.attention is None or spec.capacity > self.attention.capacity):
            # sized once for a captured step (static capacity); an eager policy whose spans grow gets a 2x larger one
            from pytest_kvcache.engines.attention import KernelAttention

            capacity = spec.capacity if cache.capturable else 2 * spec.capacity
            self.attention = KernelAttention(cache.n_slots, self.kv_heads, self.q_heads, self.head_dim, capacity,
                                             self.model.device, spec.want_probs, tuned=cache.capturable)
        if self.attention is not None:
            out, scores = self.attention(q, spec, self.scale)
        else:
            from pytest_kvcache.engines.attention import reference_attention

            out, scores = reference_attention(q, spec, self.scale)
        cache.observe(layer, spec, scores)
        return out

    def _module_layers(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """The transformers modules, called as LlamaDecoderLayer calls them."""
        batch, hq, hkv, dim = step.batch, self.q_heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = rope(attn.q_proj(h).view(batch, hq, 1, dim), step.cos, step.sin).squeeze(2)
            k = rope(attn.k_proj(h).view(batch, hkv, 1, dim), step.cos, step.sin).squeeze(2)
            v = attn.v_proj(h).view(batch, hkv, dim)
            out = self._attend(i, h, q, k, v, step)
            x = x + attn.o_proj(out.reshape(batch, hq * dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.hf.lm_head(self.hf.model.norm(x))

    def _fused_layers(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """Fused weights and Triton kernels; x (batch, hidden) is updated in place as the residual stream."""
        from pytest_kvcache import kernels

        batch, hq, hkv, dim = step.batch, self.q_heads, self.kv_heads, self.head_dim
        cos, sin = step.cos.view(batch, dim), step.sin.view(batch, dim)
        h = torch.empty_like(x)
        delta = None
        for i, w in enumerate(self.weights):
            kernels.add_rmsnorm(x, delta, w.norm_in, self.eps, h)
            qkv = F.linear(h, w.qkv)
            qk = qkv[:, : (hq + hkv) * dim].view(batch, hq + hkv, dim)
            v = qkv[:, (hq + hkv) * dim :].view(batch, hkv, dim)
            target = self.cache.write_target(i, step)
            if target is not None:
                kernels.rope_store(qk, v, cos, sin, hq, *target)
            else:
                kernels.rope_(qk, cos, sin)
            q, k = qk[:, :hq], qk[:, hq:]
            out = self._attend(i, h, q, k, v, step, written=target is not None)
            delta = self._project(out.reshape(batch, hq * dim), "o", i, x, w.norm_post)
            kernels.add_rmsnorm(x, delta, w.norm_post, self.eps, h)
            gate_up = F.linear(h, w.gate_up)
            act = torch.empty((batch, gate_up.shape[1] // 2), dtype=x.dtype, device=x.device)
            kernels.silu_mul(gate_up, act)
            delta = self._project(act, "down", i, x, w.norm_in)
        kernels.add_rmsnorm(x, delta, self.hf.model.norm.weight, self.eps, h)
        return self.hf.lm_head(h)

    def _project(self, x: torch.Tensor, name: str, layer: int, residual: torch.Tensor,
                 norm: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s o or down projection of x: split-K partials for a captured step of at most 16 rows where
        split_k measured them, with the add + RMSNorm of `residual` that reads them, faster than cuBLAS; else cuBLAS."""
        from pytest_kvcache import kernels, split_k

        weights = self.projections[name]
        if x.shape[0] <= split_k.MAX_ROWS and self.cache.capturable:
            def consumer():  # what reads the product, on scratch copies (only built when the shape is timed)
                scratch, normed = residual.clone(), torch.empty_like(residual)
                return lambda delta: kernels.add_rmsnorm(scratch, delta, norm, self.eps, normed)

            config = split_k.choose(x, weights, consumer)
            if config is not None:
                return split_k.split_k_linear(x, weights[layer], config)
        return F.linear(x, weights[layer])

    def take_step_times(self) -> list[tuple[float, int]]:
        """(milliseconds, KV bytes read) of every timed decode step since the last call (CUDA events)."""
        times = [(start.elapsed_time(end), kv_bytes) for start, end, kv_bytes in self.step_times]
        self.step_times = []
        return times
