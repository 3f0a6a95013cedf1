"""Split-K GEMM for decode steps of at most 16 rows, whose fp32 partial sums the next add + RMSNorm reduces, so
the narrow o and down projections each take one launch that keeps every SM reading.

A decode step at batch <= 16 multiplies a few rows by each weight once: the GEMM is bound by reading the weight.
cuBLAS reaches 32% (o, 2048 x 2048) and 57% (down, 2048 x 8192) of the copy bandwidth on an H200 at 8 rows
(benchmarks/results/h200/skinny-gemm.md), in one or two launches; a narrow output has too few column tiles to keep
132 SMs' loads in flight. Here K is split as well (as CUTLASS's split-K GEMMs do): program
(column tile, split) writes its fp32 partial product into partials[split]; instead of a reduction launch, the
consumer - kernels.add_rmsnorm, the residual add - sums the splits (deterministic: no atomics). Which
configuration (or cuBLAS) a shape runs is measured once per process on the shape's own weights, with that consumer,
in a CUDA graph (the way the step runs them; see `choose`). Computing SiLU(gate) * up in down's prologue was tried
and dropped: it ran 2-15x slower than cuBLAS plus the SiLU launch on the H200 (benchmarks/results/h200/README.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pytest_kvcache.kernels import INTERPRETED

MAX_ROWS = 16  # tl.dot's smallest tile: batches up to this pad to it for free (the weight read dominates)


@dataclass(frozen=True)
class SplitConfig:
    """One launch configuration: column tile, K tile, K splits, warps, pipeline stages."""

    block_n: int
    block_k: int
    splits: int
    warps: int = 4
    stages: int = 3


CONFIGS = [SplitConfig(n, k, s, 4, st) for n, k, s, st in (
    (16, 512, 1, 3), (32, 256, 2, 4), (32, 256, 4, 4), (64, 128, 4, 4), (32, 128, 8, 3), (64, 128, 8, 3),
    (16, 256, 8, 3), (64, 256, 2, 4), (128, 128, 2, 4), (32, 512, 2, 3),
)]
CHOSEN: dict[tuple, SplitConfig | None] = {}  # (N, K, dtype) -> the measured choice; None: cuBLAS
TIMES: dict[tuple, list[float]] = {}  # the same key -> us per layer of cuBLAS, then of each of CONFIGS


@triton.jit
def _split_k_kernel(X, W, PART, M, N, K, stride_xm, stride_wn, stride_ps, stride_pm, k_per_split,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    col_tile = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = split * k_per_split
    for k0 in range(start, start + k_per_split, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=row_ok & (ks[None, :] < K), other=0.0)
        w = tl.load(W + cols[:, None] * stride_wn + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K),
                    other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    tl.store(PART + split * stride_ps + rows[:, None] * stride_pm + cols[None, :], acc,
             mask=row_ok & (cols[None, :] < N))


def split_k_linear(x: torch.Tensor, weight: torch.Tensor, config: SplitConfig) -> torch.Tensor:
    """fp32 partials (splits, M, N) whose sum over dim 0 is x @ weight.T, for x (M, K) with M <= 16."""
    rows = x.shape[0]
    n, k = weight.shape
    if rows > MAX_ROWS or x.shape[1] != k:
        raise ValueError(f"split_k_linear: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)} "
                         f"(at most {MAX_ROWS} rows)")
    per_split = triton.cdiv(triton.cdiv(k, config.splits), config.block_k) * config.block_k
    partials = torch.empty((config.splits, rows, n), dtype=torch.float32, device=x.device)
    _split_k_kernel[(triton.cdiv(n, config.block_n), config.splits)](
        x, weight, partials, rows, n, k, x.stride(0), weight.stride(0), partials.stride(0), partials.stride(1),
        per_split, PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=MAX_ROWS,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.warps, num_stages=config.stages)
    return partials


def graph_ms(fn, replays: int = 50) -> float:
    """Median ms of one call of fn, captured in a CUDA graph (as the decode step runs it), after warm-ups."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def choose(x: torch.Tensor, weights: list[torch.Tensor],
           consumer: Callable[[], Callable[[torch.Tensor], None]]) -> SplitConfig | None:
    """The fastest of cuBLAS (None) and CONFIGS for this weight shape, each timed once per process as the step runs
    it - over `weights` (every layer's, in sequence, so none is read from L2), each product followed by what
    `consumer()` returns (the add + RMSNorm that reads it: summing more splits costs there), in a CUDA graph. Rows
    are padded to 16, so M is not in the key. Under Triton's interpreter (the CPU tests) a split configuration,
    untimed, so the tests run this path."""
    n, k = weights[0].shape
    key = (n, k, str(x.dtype))
    if key in CHOSEN:
        return CHOSEN[key]
    if INTERPRETED:
        CHOSEN[key] = CONFIGS[1]
        return CONFIGS[1]
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"split-K GEMM {n}x{k} reached a graph capture untuned: run the step once first")
    candidates: list[SplitConfig | None] = [None, *CONFIGS]
    consume = consumer()
    times = []
    for config in candidates:
        if config is None:
            def run() -> None:
                for w in weights:
                    consume(F.linear(x, w))
        else:
            def run(c: SplitConfig = config) -> None:
                for w in weights:
                    consume(split_k_linear(x, w, c))
        try:
            times.append(graph_ms(run) * 1e3 / len(weights))
        except (RuntimeError, triton.runtime.errors.OutOfResources):  # a tile this GPU cannot hold: not a candidate
            times.append(float("inf"))
    CHOSEN[key] = candidates[times.index(min(times))]
    TIMES[key] = times
    return CHOSEN[key]


def chosen_configs() -> list[dict]:
    """Every weight shape chosen for in this process, its choice, and microseconds per layer (product + consumer) of
    cuBLAS and of each configuration (for benchmark reports)."""
    return [{"N": n, "K": k, "dtype": dtype, "choice": "cublas" if config is None else vars(config),
             "us_per_layer": dict(zip(["cublas"] + [_name(c) for c in CONFIGS], TIMES.get((n, k, dtype), [])))}
            for (n, k, dtype), config in CHOSEN.items()]


def _name(config: SplitConfig) -> str:
    return f"{config.block_n}/{config.block_k}/{config.splits}/{config.warps}w/{config.stages}s"
