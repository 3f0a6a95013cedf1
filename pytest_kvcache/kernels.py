"""Triton kernels of the CUDA decode step: split-K decode attention over ragged KV, fused add + RMSNorm, RoPE, SiLU.

Imported only on CUDA (or with TRITON_INTERPRET=1 in the tests); the CPU path uses the torch references in
engines/attention.py and engines/decoder.py.

Decode attention follows FlashDecoding (Dao et al., "Flash-Decoding for long-context inference", 2023): the KV of
each request is split into chunks of CHUNK tokens; one program per (chunk, KV head, request) computes the chunk's
partial softmax numerator/denominator for all query heads of that KV head at once (GQA: the group's queries are the
rows of one matrix product, so each KV byte is read once); programs of chunks past a request's length exit at once;
the last program of a (request, KV head) to finish combines the partials in the same launch (an atomic counter), so
one launch does the whole attention and it can be captured in a CUDA graph. Keys are read either from per-slot
storage (S, Hkv, T, D), row r reading slot r, or through a block table from a pool of blocks (paged). For a
captured step the chunk/tile/pipelining configuration is tuned per shape (rows rounded up to a power of two) during
the warm-up before capture, timed with every row at the full capacity; eager steps use the fixed default.
"""

from __future__ import annotations

import os
import time

import torch
import triton
import triton.language as tl

CHUNK, BLOCK_N = 256, 64  # the configuration that measured 84-87% of the bandwidth at batch 32 on an H200
SMALLEST_CHUNK = 64  # the workspace holds partials for chunks this small


@triton.jit(do_not_specialize=["capacity", "n_sink"])  # every capacity and sink count runs one compiled kernel
def _decode_attention_kernel(
    Q, QS, K, V, LENGTHS, TABLE, OUT, PART_O, PART_M, PART_L, LOCKS, LOGITS, LSE,
    scale, capacity, kv_heads, n_sink,
    stride_qr, stride_qh, stride_sr, stride_sh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_tr, stride_or, stride_oh, stride_lr, stride_lh,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_SINK: tl.constexpr, WRITE_LOGITS: tl.constexpr,
    PRECISION: tl.constexpr, GROUP_P2: tl.constexpr, COMBINE: tl.constexpr,
):
    chunk = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.program_id(2)
    n_chunks = tl.cdiv(capacity, CHUNK)
    length = tl.load(LENGTHS + row).to(tl.int32)
    start = chunk * CHUNK
    if start < length:
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        in_group = g < G
        q_heads = head * G + g
        q_ptrs = Q + row * stride_qr + q_heads[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptrs, mask=in_group[:, None], other=0.0)
        if HAS_SINK:
            qs = tl.load(QS + row * stride_sr + q_heads[:, None] * stride_sh + d[None, :], mask=in_group[:, None],
                         other=0.0)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        end = tl.minimum(start + CHUNK, length)
        for n0 in range(start, end, BLOCK_N):
            cells = n0 + tl.arange(0, BLOCK_N)
            valid = cells < end
            if PAGED:
                block = tl.load(TABLE + row * stride_tr + cells // BLOCK_SIZE, mask=valid, other=0)
                k_off = block * stride_kb + head * stride_kh + (cells % BLOCK_SIZE) * stride_kt
                v_off = block * stride_vb + head * stride_vh + (cells % BLOCK_SIZE) * stride_vt
            else:
                k_off = row * stride_kb + head * stride_kh + cells * stride_kt
                v_off = row * stride_vb + head * stride_vh + cells * stride_vt
            k = tl.load(K + k_off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            if HAS_SINK:
                if n0 < n_sink:
                    s_sink = tl.dot(qs, tl.trans(k), input_precision=PRECISION) * scale
                    s = tl.where((cells < n_sink)[None, :], s_sink, s)
            s = tl.where(valid[None, :], s, float("-inf"))
            if WRITE_LOGITS:
                l_ptrs = LOGITS + row * stride_lr + q_heads[:, None] * stride_lh + cells[None, :]
                tl.store(l_ptrs, s, mask=in_group[:, None] & valid[None, :])
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(V + v_off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        part = (row * kv_heads + head) * n_chunks + chunk
        tl.store(PART_O + (part * G + g[:, None]) * D + d[None, :], acc, mask=in_group[:, None])
        tl.store(PART_M + part * G + g, m, mask=in_group)
        tl.store(PART_L + part * G + g, l, mask=in_group)
        active = tl.cdiv(length, CHUNK)
        done = tl.atomic_add(LOCKS + row * kv_heads + head, 1)
        if done == active - 1:
            # combine the chunks' partials in one pass (online rescaling, as within a chunk), COMBINE chunks per
            # vector load: their loads are independent, so a long combine is a few round trips, not 2 x chunks
            first = (row * kv_heads + head) * n_chunks
            gg = tl.arange(0, GROUP_P2)
            real = gg < G
            big_m = tl.full([GROUP_P2], float("-inf"), tl.float32)
            big_l = tl.zeros([GROUP_P2], tl.float32)
            out = tl.zeros([GROUP_P2, D], tl.float32)
            for j0 in range(0, active, COMBINE):
                js = first + j0 + tl.arange(0, COMBINE)
                there = ((j0 + tl.arange(0, COMBINE)) < active)[:, None] & real[None, :]
                mj = tl.load(PART_M + js[:, None] * G + gg[None, :], mask=there, other=float("-inf"),
                             cache_modifier=".cg")
                lj = tl.load(PART_L + js[:, None] * G + gg[None, :], mask=there, other=0.0, cache_modifier=".cg")
                oj = tl.load(PART_O + (js[:, None, None] * G + gg[None, :, None]) * D + d[None, None, :],
                             mask=there[:, :, None], other=0.0, cache_modifier=".cg")
                m_new = tl.maximum(big_m, tl.max(mj, 0))  # finite for real rows: chunk 0 holds >= 1 valid cell
                alpha = tl.where(real, tl.exp(big_m - m_new), 0.0)
                w = tl.where(there, tl.exp(mj - m_new[None, :]), 0.0)
                big_l = big_l * alpha + tl.sum(lj * w, 0)
                out = out * alpha[:, None] + tl.sum(oj * w[:, :, None], 0)
                big_m = m_new
            big_l = tl.where(real, big_l, 1.0)
            heads_out = head * G + gg
            o_ptrs = OUT + row * stride_or + heads_out[:, None] * stride_oh + d[None, :]
            tl.store(o_ptrs, (out / big_l[:, None]).to(OUT.dtype.element_ty), mask=real[:, None])
            if WRITE_LOGITS:
                tl.store(LSE + row * kv_heads * G + heads_out, big_m + tl.log(big_l), mask=real)
            tl.atomic_xchg(LOCKS + row * kv_heads + head, 0)


class DecodeWorkspace:
    """Scratch of the split-K kernel for up to `rows` requests of up to `capacity` cells: partial results and the
    per-(request, KV head) counters, allocated once so a captured graph keeps using the same memory."""

    def __init__(self, rows: int, kv_heads: int, group: int, head_dim: int, capacity: int,
                 device: torch.device) -> None:
        self.rows, self.kv_heads, self.group, self.head_dim = rows, kv_heads, group, head_dim
        self.capacity = max(capacity, 1)
        parts = rows * kv_heads * triton.cdiv(self.capacity, SMALLEST_CHUNK) * group
        self.part_o = torch.empty(parts * head_dim, dtype=torch.float32, device=device)
        self.part_m = torch.empty(parts, dtype=torch.float32, device=device)
        self.part_l = torch.empty(parts, dtype=torch.float32, device=device)
        self.locks = torch.zeros(rows * kv_heads, dtype=torch.int32, device=device)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                     scale: float, workspace: DecodeWorkspace, out: torch.Tensor, *,
                     block_table: torch.Tensor | None = None, sink_query: torch.Tensor | None = None,
                     n_sink: int = 0, logits: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                     tuned: bool = False, config: triton.Config | None = None) -> None:
    """out (R, Hq, D) = softmax(q k^T * scale) v over the first lengths[r] cells of each request r.

    q (R, Hq, D); keys/values (S, Hkv, T, D) per-slot storage (row r reads slot r), or with block_table (R, max
    blocks) a pool (blocks, Hkv, block_size, D); lengths (R,) integer (0: the row is skipped and `out` left as is).
    sink_query (R, Hq, D) replaces q for cells < n_sink (StreamingLLM's sinks, see strategies/streaming.py).
    logits (R, Hq, T) float32 receives the scaled scores of the valid cells and lse (R, Hq) their log-sum-exp
    (H2O's accumulated attention is exp(logits - lse)). tuned: the configuration tuned for this shape (see
    _tuned_config; only where every shape is first seen outside a graph capture: the captured step's warm-up).
    config: this configuration instead (benchmarks compare them).
    """
    rows, q_heads, dim = q.shape
    kv_heads = keys.shape[1]
    group = q_heads // kv_heads
    if rows > workspace.rows or kv_heads != workspace.kv_heads or group != workspace.group:
        raise ValueError(f"workspace for {workspace.rows} rows x {workspace.kv_heads} KV heads, got {rows} x {kv_heads}")
    paged = block_table is not None
    write_logits = logits is not None
    table = block_table if paged else lengths
    logit_buf = logits if write_logits else out
    lse_buf = lse if write_logits else out
    sink = sink_query if sink_query is not None else q
    args = (
        q, sink, keys, values, lengths, table, out,
        workspace.part_o, workspace.part_m, workspace.part_l, workspace.locks, logit_buf, lse_buf,
        scale, workspace.capacity, kv_heads, n_sink,
        q.stride(0), q.stride(1), sink.stride(0), sink.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        table.stride(0) if paged else 0, out.stride(0), out.stride(1),
        logit_buf.stride(0) if write_logits else 0, logit_buf.stride(1) if write_logits else 0,
    )
    group_p2 = triton.next_power_of_2(group)
    flags = dict(G=group, BLOCK_G=max(16, group_p2), D=dim, PAGED=paged, BLOCK_SIZE=keys.shape[2] if paged else 1,
                 HAS_SINK=sink_query is not None, WRITE_LOGITS=write_logits, PRECISION=_precision(q),
                 GROUP_P2=group_p2, COMBINE=max(1, 4096 // (group_p2 * dim)))

    if config is None:
        config = (_tuned_config(q, keys, lengths, table, out, logit_buf, args, flags, workspace.capacity) if tuned
                  else DEFAULT_CONFIG)
    _launch(config, args, flags, workspace.capacity, kv_heads, rows)


def _launch(config: triton.Config, args: tuple, flags: dict, capacity: int, kv_heads: int, rows: int) -> None:
    grid = (triton.cdiv(capacity, config.kwargs["CHUNK"]), kv_heads, rows)
    _decode_attention_kernel[grid](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                                   num_stages=config.num_stages)


def _short_bench(fn) -> float:
    """Mean ms of fn (Triton's do_bench, shortened to a 5 ms warm-up and 20 ms of runs): it runs once per shape
    before capture. In Triton's interpreter (the CPU tests) one timed run, so the tuned path is exercised there too."""
    if INTERPRETED:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return triton.testing.do_bench(fn, warmup=5, rep=20)


DEFAULT_CONFIG = triton.Config({"CHUNK": CHUNK, "BLOCK_N": BLOCK_N}, num_warps=4, num_stages=2)  # eager steps
ATTENTION_CONFIGS = [  # few: each one compiles once per kernel specialization
    DEFAULT_CONFIG,
    triton.Config({"CHUNK": 512, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"CHUNK": 128, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"CHUNK": SMALLEST_CHUNK, "BLOCK_N": 64}, num_warps=4, num_stages=2),  # small batches fill the SMs
    # 2 warps: at head dim 64 (1B, batch 8, length 2048) 15.5-16.3 us per layer against 17.8-24.4 with 4 (call 24)
    triton.Config({"CHUNK": 256, "BLOCK_N": 64}, num_warps=2, num_stages=3),
    triton.Config({"CHUNK": 128, "BLOCK_N": 64}, num_warps=2, num_stages=2),
]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TUNED: dict[tuple, triton.Config] = {}  # shape key -> the configuration chosen for it (see _tuned_config)


def _tuned_config(q, keys, lengths, table, out, logits, args, flags, capacity) -> triton.Config:
    """The fastest of ATTENTION_CONFIGS for this shape, timed once per shape with every row at the full capacity
    (the warm-up before capture runs with the rows nearly empty: timing those launches picks by noise), into a
    scratch output, and for a pool through a block table of distinct blocks. Keyed by the rows rounded up to a power
    of two, the capacity, the dtypes and the kernel's specialization."""
    rows, kv_heads = q.shape[0], keys.shape[1]
    paged = flags["PAGED"]
    cells = table.shape[1] * keys.shape[2] if paged else keys.shape[2]
    key = (triton.next_power_of_2(rows), capacity, cells, str(q.dtype), str(keys.dtype), str(logits.dtype),
           *sorted(flags.items()))
    config = TUNED.get(key)
    if config is None:
        tune_args = list(args)
        tune_args[4] = torch.full_like(lengths, min(capacity, cells))  # LENGTHS
        if paged:  # TABLE
            blocks = torch.arange(table.numel(), device=table.device) % keys.shape[0]
            tune_args[5] = blocks.to(table.dtype).view(table.shape)
        tune_args[6] = torch.empty_like(out)  # OUT
        times = [_short_bench(lambda c=c: _launch(c, tuple(tune_args), flags, capacity, kv_heads, rows))
                 for c in ATTENTION_CONFIGS]
        config = TUNED[key] = ATTENTION_CONFIGS[times.index(min(times))]
    return config


def tuned_configs() -> list[dict]:
    """Every shape tuned in this process and the configuration chosen for it (for benchmark reports)."""
    return [{"rows_pow2": key[0], "capacity": key[1], **dict(key[6:]), **config.kwargs,
             "num_warps": config.num_warps, "num_stages": config.num_stages} for key, config in TUNED.items()]


def _precision(x: torch.Tensor) -> str:
    """float32 inputs get exact products (not TF32), so fp32 runs match the torch path; bf16/fp16 use the MMA."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


@triton.jit
def _add_rmsnorm_kernel(X, DELTA, W, OUT, eps, n_cols, stride_x, stride_dp, stride_d, stride_o,
                        HAS_DELTA: tl.constexpr, PARTS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        if PARTS > 0:  # fp32 split-K partials (split_k.py): their sum, rounded as the GEMM's output would be;
            total = tl.zeros((BLOCK,), dtype=tl.float32)  # unrolled, so every part's load is in flight at once
            for part in tl.static_range(PARTS):
                total += tl.load(DELTA + part * stride_dp + row * stride_d + cols, mask=mask, other=0.0)
            delta = total.to(X.dtype.element_ty)
        else:
            delta = tl.load(DELTA + row * stride_d + cols, mask=mask, other=0.0)
        x = x + delta
        tl.store(X + row * stride_x + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (normed * w).to(OUT.dtype.element_ty), mask=mask)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                out: torch.Tensor) -> None:
    """x += delta (in place, rounded to x's dtype as the residual add of transformers' Llama), then
    out = weight * rmsnorm(x) with the normalisation in float32: transformers' LlamaRMSNorm in one pass. delta is
    (R, C) in x's dtype, or (splits, R, C) float32 partial sums (split_k.split_k_linear), summed here."""
    rows, cols = x.shape
    partial = delta is not None and delta.dim() == 3
    _add_rmsnorm_kernel[(rows,)](
        x, delta if delta is not None else x, weight, out, eps, cols, x.stride(0),
        delta.stride(0) if partial else 0, delta.stride(-2) if delta is not None else 0, out.stride(0),
        HAS_DELTA=delta is not None, PARTS=delta.shape[0] if partial else 0, BLOCK=triton.next_power_of_2(cols),
        num_warps=8 if cols >= 4096 else 4,
    )


@triton.jit
def _rotated(src, COS, SIN, row, stride_cr, HALF: tl.constexpr):
    """The two halves of one head's vector at `src` rotated by row `row` of COS/SIN (rotate-half RoPE)."""
    i = tl.arange(0, HALF)
    lo = tl.load(src + i).to(tl.float32)
    hi = tl.load(src + HALF + i).to(tl.float32)
    cos_lo = tl.load(COS + row * stride_cr + i).to(tl.float32)
    cos_hi = tl.load(COS + row * stride_cr + HALF + i).to(tl.float32)
    sin_lo = tl.load(SIN + row * stride_cr + i).to(tl.float32)
    sin_hi = tl.load(SIN + row * stride_cr + HALF + i).to(tl.float32)
    return lo * cos_lo - hi * sin_lo, hi * cos_hi + lo * sin_hi


@triton.jit
def _rope_kernel(X, OUT, COS, SIN, stride_xr, stride_xh, stride_or, stride_oh, stride_cr, HALF: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    i = tl.arange(0, HALF)
    new_lo, new_hi = _rotated(X + row * stride_xr + head * stride_xh, COS, SIN, row, stride_cr, HALF)
    dst = OUT + row * stride_or + head * stride_oh
    tl.store(dst + i, new_lo.to(OUT.dtype.element_ty))
    tl.store(dst + HALF + i, new_hi.to(OUT.dtype.element_ty))


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x (R, H, D) by cos/sin (R, D), Llama's rotate-half RoPE x*cos + rotate_half(x)*sin: in place, or into
    `out` (R, H, D) when given; returns the rotated tensor."""
    rows, heads, dim = x.shape
    out = x if out is None else out
    _rope_kernel[(rows, heads)](x, out, cos, sin, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                                cos.stride(0), HALF=dim // 2, num_warps=1)
    return out


def rope_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """A rotated copy of x (R, H, D) by cos/sin (R, D) (x is left as it is)."""
    return rope_(x, cos, sin, torch.empty(x.shape, dtype=x.dtype, device=x.device))


@triton.jit
def _silu_mul_kernel(GU, OUT, n_cols, stride_g, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(GU + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GU + row * stride_g + n_cols + cols, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(GU.dtype.element_ty)
    tl.store(OUT + row * stride_o + cols, act * up, mask=mask)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor) -> None:
    """out = silu(gate) * up for gate_up = [gate | up] (R, 2I): LlamaMLP's activation in one pass."""
    rows, cols = out.shape
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(cols, block))](gate_up, out, cols, gate_up.stride(0), out.stride(0),
                                                       BLOCK=block, num_warps=4)


@triton.jit
def _row_lse_kernel(Q, K, LSE, scale, length, stride_qh, stride_qp, stride_kh, stride_kp,
                    G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    block = tl.program_id(0)
    q_head = tl.program_id(1)
    rows = block * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    q = tl.load(Q + q_head * stride_qh + rows[:, None] * stride_qp + d[None, :], mask=(rows < length)[:, None],
                other=0.0)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK], tl.float32)
    for n0 in range(0, (block + 1) * BLOCK, BLOCK):
        cols = n0 + tl.arange(0, BLOCK)
        k = tl.load(K + (q_head // G) * stride_kh + cols[:, None] * stride_kp + d[None, :],
                    mask=(cols < length)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where((cols[None, :] <= rows[:, None]) & (cols < length)[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m = m_new
    tl.store(LSE + q_head * length + rows, m + tl.log(l), mask=rows < length)


@triton.jit
def _column_sum_kernel(Q, K, LSE, OUT, scale, length, stride_qh, stride_qp, stride_kh, stride_kp,
                       G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    k = tl.load(K + kv_head * stride_kh + cols[:, None] * stride_kp + d[None, :], mask=(cols < length)[:, None],
                other=0.0)
    acc = tl.zeros([BLOCK], tl.float32)
    for g in range(G):
        q_head = kv_head * G + g
        for m0 in range(block * BLOCK, length, BLOCK):
            rows = m0 + tl.arange(0, BLOCK)
            in_rows = rows < length
            q = tl.load(Q + q_head * stride_qh + rows[:, None] * stride_qp + d[None, :], mask=in_rows[:, None],
                        other=0.0)
            lse = tl.load(LSE + q_head * length + rows, mask=in_rows, other=float("inf"))
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            p = tl.exp(s - lse[:, None])
            p = tl.where((cols[None, :] <= rows[:, None]) & in_rows[:, None] & (cols < length)[None, :], p, 0.0)
            acc += tl.sum(p, 0)
    tl.store(OUT + kv_head * length + cols, acc, mask=cols < length)


def causal_column_sums(q: torch.Tensor, k: torch.Tensor, scale: float, block: int = 64) -> torch.Tensor:
    """(Hkv, P) float32: for each key, the causal softmax weight every query row gave it, summed over rows and
    over the query heads of its KV head; q (Hq, P, D), k (Hkv, P, D). Two FlashAttention-style passes (each
    row's log-sum-exp, then exp(s - lse) summed by column), never materialising the P x P matrix: H2O's prefill
    scores at the cost of one causal QK^T."""
    q_heads, length, dim = q.shape
    kv_heads = k.shape[0]
    q, k = q.contiguous(), k.contiguous()
    lse = torch.empty((q_heads, length), dtype=torch.float32, device=q.device)
    out = torch.empty((kv_heads, length), dtype=torch.float32, device=q.device)
    blocks = triton.cdiv(length, block)
    common = dict(G=q_heads // kv_heads, D=dim, BLOCK=block, PRECISION=_precision(q), num_warps=4)
    _row_lse_kernel[(blocks, q_heads)](q, k, lse, scale, length, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                       **common)
    _column_sum_kernel[(blocks, kv_heads)](q, k, lse, out, scale, length, q.stride(0), q.stride(1), k.stride(0),
                                           k.stride(1), **common)
    return out


@triton.jit
def _store_kv_kernel(K, V, NEW_K, NEW_V, OUTER, CELL, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh,
                     stride_vt, stride_nkr, stride_nkh, stride_nvr, stride_nvh, D: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    outer = tl.load(OUTER + row)
    cell = tl.load(CELL + row)
    d = tl.arange(0, D)
    k = tl.load(NEW_K + row * stride_nkr + head * stride_nkh + d)
    v = tl.load(NEW_V + row * stride_nvr + head * stride_nvh + d)
    tl.store(K + outer * stride_kb + head * stride_kh + cell * stride_kt + d, k)
    tl.store(V + outer * stride_vb + head * stride_vh + cell * stride_vt + d, v)


def store_kv(keys: torch.Tensor, values: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
             outer: torch.Tensor, cell: torch.Tensor) -> None:
    """keys[outer[r], :, cell[r]] = new_k[r] (and values) for every row r in one launch: keys/values (X, Hkv, T,
    D) are a layer's slots (outer = slot) or block pool (outer = block, cell = offset); new_k/new_v (R, Hkv, D)."""
    rows, heads, dim = new_k.shape
    _store_kv_kernel[(rows, heads)](
        keys, values, new_k, new_v, outer, cell, keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0),
        values.stride(1), values.stride(2), new_k.stride(0), new_k.stride(1), new_v.stride(0), new_v.stride(1),
        D=dim, num_warps=1,
    )


@triton.jit
def _h2o_update_kernel(LOGITS, LSE, SCORE, POS, K, V, LENGTHS, WRITE, FULL, WINDOW, POSITION,
                       stride_lr, stride_lh, stride_er, stride_sr, stride_sh, stride_kb, stride_kh, stride_kt,
                       stride_vb, stride_vh, stride_vt, G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    length = tl.load(LENGTHS + row)
    write = tl.load(WRITE + row)
    full = tl.load(FULL + row)
    window = tl.load(WINDOW + row)
    position = tl.load(POSITION + row)
    best = float("inf")
    victim = write
    new_score = 0.0
    for t0 in range(0, length, BLOCK):
        cells = t0 + tl.arange(0, BLOCK)
        valid = cells < length
        p = tl.zeros([BLOCK], tl.float32)
        for g in range(G):
            q_head = head * G + g
            logits = tl.load(LOGITS + row * stride_lr + q_head * stride_lh + cells, mask=valid, other=float("-inf"))
            p += tl.exp(logits - tl.load(LSE + row * stride_er + q_head))
        score_ptr = SCORE + row * stride_sr + head * stride_sh + cells
        pos_ptr = POS + row * stride_sr + head * stride_sh + cells
        is_new = cells == write
        score = tl.where(is_new, p, tl.load(score_ptr, mask=valid, other=0.0) + p)
        pos = tl.where(is_new, position, tl.load(pos_ptr, mask=valid, other=0))
        tl.store(score_ptr, score, mask=valid)
        tl.store(pos_ptr, pos, mask=valid & is_new)
        new_score += tl.sum(tl.where(is_new & valid, score, 0.0), 0)
        candidate = tl.where(valid & (pos < window), score, float("inf"))
        low = tl.min(candidate, 0)
        if low < best:
            best = low
            victim = (t0 + tl.argmin(candidate, 0)).to(tl.int64)
    if full != 0:
        if victim != write:
            d = tl.arange(0, D)
            k_row = K + row * stride_kb + head * stride_kh
            v_row = V + row * stride_vb + head * stride_vh
            tl.store(k_row + victim * stride_kt + d, tl.load(k_row + write * stride_kt + d))
            tl.store(v_row + victim * stride_vt + d, tl.load(v_row + write * stride_vt + d))
            tl.store(SCORE + row * stride_sr + head * stride_sh + victim, new_score)
            tl.store(POS + row * stride_sr + head * stride_sh + victim, position)


def h2o_update(logits: torch.Tensor, lse: torch.Tensor, score: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor, lengths: torch.Tensor, write: torch.Tensor, full: torch.Tensor,
               window: torch.Tensor, position: torch.Tensor) -> None:
    """H2O after one decode step's attention, in one launch per (request, KV head): the weights exp(logits - lse)
    summed over the query group are added to the accumulated scores (the new cell `write` starts from its own
    weight and gets `position`); where the slot is full, the lowest-scoring cell older than `window` (lowest
    index on ties) receives the new cell's K, V, score and position (the spare cell is then free again).

    logits (R, Hq, T) float32 and lse (R, Hq) from decode_attention; score/pos (slots, Hkv, T) float32/int64 and
    keys/values (slots, Hkv, T, D) of the layer; lengths/write/full/window/position (R,) integers."""
    rows, q_heads, _ = logits.shape
    kv_heads = score.shape[1]
    _h2o_update_kernel[(rows, kv_heads)](
        logits, lse, score, pos, keys, values, lengths, write, full, window, position,
        logits.stride(0), logits.stride(1), lse.stride(0), score.stride(0), score.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        G=q_heads // kv_heads, D=keys.shape[3], BLOCK=256, num_warps=4,
    )


@triton.jit
def _rope_store_kernel(QK, V, COS, SIN, K_CACHE, V_CACHE, OUTER, CELL, stride_xr, stride_xh, stride_vr, stride_vh,
                       stride_cr, stride_kb, stride_kh, stride_kt, stride_cb, stride_ch, stride_ct, q_heads,
                       HALF: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    i = tl.arange(0, HALF)
    base = QK + row * stride_xr + head * stride_xh
    new_lo, new_hi = _rotated(base, COS, SIN, row, stride_cr, HALF)
    new_lo = new_lo.to(QK.dtype.element_ty)
    new_hi = new_hi.to(QK.dtype.element_ty)
    tl.store(base + i, new_lo)
    tl.store(base + HALF + i, new_hi)
    if head >= q_heads:
        kv_head = head - q_heads
        outer = tl.load(OUTER + row)
        cell = tl.load(CELL + row)
        k_dst = K_CACHE + outer * stride_kb + kv_head * stride_kh + cell * stride_kt
        tl.store(k_dst + i, new_lo)
        tl.store(k_dst + HALF + i, new_hi)
        v_src = V + row * stride_vr + kv_head * stride_vh
        v_dst = V_CACHE + outer * stride_cb + kv_head * stride_ch + cell * stride_ct
        tl.store(v_dst + i, tl.load(v_src + i))
        tl.store(v_dst + HALF + i, tl.load(v_src + HALF + i))


def rope_store(qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_heads: int,
               keys: torch.Tensor, values: torch.Tensor, outer: torch.Tensor, cell: torch.Tensor) -> None:
    """RoPE on q and k in place (qk (R, Hq + Hkv, D), q heads first) and the rotated k with v (R, Hkv, D) written
    to keys/values[outer[r], :, cell[r]] (see store_kv): the decode step's rotation and KV write in one launch."""
    rows, heads, dim = qk.shape
    _rope_store_kernel[(rows, heads)](
        qk, v, cos, sin, keys, values, outer, cell, qk.stride(0), qk.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1),
        values.stride(2), q_heads, HALF=dim // 2, num_warps=1,
    )
