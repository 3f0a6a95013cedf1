"""Which GEMM backend a small-batch decode step should use: cuBLAS, cuBLASLt or a Triton skinny GEMM, per weight
shape, and what each does to the whole 1B batch-8 step.

A decode step at batch <= 16 multiplies a few rows by every weight matrix once, so each GEMM is bound by reading
its weight; cuBLAS splits K for the narrow ones and adds a reduction kernel. Measured on one GPU in bf16:
  1. per shape (the 1B and 8B layers' q/k/v, o, gate/up, down, and the output head): microseconds per GEMM and
     the fraction of the copy bandwidth its weight bytes reach, for each backend (and each Triton configuration),
     over `layers` distinct weights in sequence, captured in one CUDA graph (as the step runs them: no weight is
     still in L2 when it is read again);
  2. the engine's 1B batch-8 context-2k decode step (gpu_decode.decode_case) with each backend.

    python benchmarks/skinny_gemm.py --out benchmarks/results/h200/skinny-gemm
    (writes .shapes.json once part 1 is done, so a run cut off in part 2 keeps it; then .json with both, and .md)

Since pytest_kvcache/split_k.py landed, the step's o and down projections go through split_k.choose whatever
F.linear is, so part 2 compares backends on q/k/v, gate/up and the head only; the committed report predates it.

Result on the H200 (benchmarks/results/h200/skinny-gemm.md): the three backends are within 3% of each other on
the 1B shapes (the narrow q/k/v, o and down GEMMs stay at 32-58% of the copy bandwidth whichever runs them), and the
Triton GEMM makes the 1B batch-8 step 1.5% faster; the engine keeps cuBLAS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpu_decode  # beside this script: on sys.path when it runs as one

from pytest_kvcache.engines.roofline import copy_bandwidth
from pytest_kvcache.split_k import graph_ms

SHAPES = [  # (name, rows M, N, K, layers)
    ("1B qkv", 8, 3072, 2048, 16), ("1B o", 8, 2048, 2048, 16), ("1B gate_up", 8, 16384, 2048, 16),
    ("1B down", 8, 2048, 8192, 16), ("1B head", 8, 128256, 2048, 1),
    ("8B qkv", 1, 6144, 4096, 32), ("8B o", 1, 4096, 4096, 32), ("8B gate_up", 1, 28672, 4096, 32),
    ("8B down", 1, 4096, 14336, 32),
]
CONFIGS = [(bn, bk, w, s) for bn in (16, 32, 64) for bk in (128, 256, 512) for w in (4,) for s in (3, 5)]


@triton.jit
def _skinny_kernel(X, W, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=rows[:, None] < M, other=0.0)
        w = tl.load(W + cols[:, None] * stride_wn + ks[None, :], mask=cols[:, None] < N, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def skinny(x: torch.Tensor, w: torch.Tensor, config: tuple, out: torch.Tensor | None = None) -> torch.Tensor:
    bn, bk, warps, stages = config
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
    _skinny_kernel[(triton.cdiv(n, bn),)](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
                                          BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out


def per_call_us(fn, count: int) -> float:
    """Microseconds per GEMM of fn(), which runs `count` of them, captured in one CUDA graph."""
    return graph_ms(fn) * 1e3 / count


def measure_shape(name: str, m: int, n: int, k: int, layers: int, bandwidth: float) -> list[dict]:
    """Every backend (and Triton configuration) on `layers` distinct (n, k) weights in sequence."""
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    ref = F.linear(x, ws[0]).float()
    rows = []

    def row(backend: str, us: float, config: tuple | None = None, error: float | str | None = None) -> dict:
        return {"shape": name, "M": m, "N": n, "K": k, "backend": backend, "config": config, "us": us,
                "bandwidth_fraction": n * k * 2 / (us * 1e-6) / bandwidth, "max_abs_error": error}

    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        rows.append(row(lib, per_call_us(lambda: [torch.matmul(x, w.t(), out=o) for w, o in zip(ws, outs)], layers)))
    torch.backends.cuda.preferred_blas_library("cublas")
    for config in CONFIGS:
        try:
            error = float((skinny(x, ws[0], config).float() - ref).abs().max())
            us = per_call_us(lambda c=config: [skinny(x, w, c, o) for w, o in zip(ws, outs)], layers)
        except (RuntimeError, triton.runtime.errors.OutOfResources) as exc:  # recorded, not fatal
            rows.append(row("triton", float("nan"), config, repr(exc)[:120]))
            continue
        rows.append(row("triton", us, config, error))
    return rows


def best_triton(rows: list[dict]) -> dict[str, dict]:
    """Shape name -> the fastest Triton configuration's row (configurations that failed have no time)."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["backend"] == "triton" and r["us"] == r["us"] and (r["shape"] not in out or r["us"] < out[r["shape"]]["us"]):
            out[r["shape"]] = r
    return out


def shape_rows(bandwidth: float) -> list[dict]:
    rows = []
    for shape in SHAPES:
        measured = measure_shape(*shape, bandwidth)
        best = best_triton(measured)[shape[0]]
        print(shape[0], {r["backend"]: round(r["us"], 2) for r in measured if r["backend"] != "triton"},
              "triton best", best["config"], round(best["us"], 2), flush=True)
        rows += measured
        torch.cuda.empty_cache()
    return rows


def step_rows(rows: list[dict]) -> list[dict]:
    """The whole 1B batch-8 step with each backend (Triton: the best configuration per weight shape above)."""
    from pytest_kvcache.engines import decoder
    from pytest_kvcache.models import load_model

    model = load_model("llama-1b", device="cuda", dtype=torch.bfloat16)
    configs = {(r["N"], r["K"]): tuple(r["config"]) for r in best_triton(rows).values()}
    torch_linear = F.linear

    def triton_linear(x, w, bias=None):
        config = configs.get(tuple(w.shape))
        if bias is not None or config is None or x.dim() != 2 or x.shape[0] > 16:
            return torch_linear(x, w, bias)
        return skinny(x, w, config)

    out = []
    for backend in ("cublas", "cublaslt", "triton", "cublas"):
        torch.backends.cuda.preferred_blas_library("cublaslt" if backend == "cublaslt" else "cublas")
        decoder.F = types.SimpleNamespace(**{**vars(F), "linear": triton_linear}) if backend == "triton" else F
        started = time.perf_counter()
        case = gpu_decode.decode_case(model, "full", 8, 2048)
        case.pop("attention_configs_tuned")
        out.append({"backend": backend, "seconds": time.perf_counter() - started, **case})
        print(backend, round(case["decode_step_ms"], 4), "ms", round(case["roofline_fraction"], 4), flush=True)
    decoder.F = F
    torch.backends.cuda.preferred_blas_library("cublas")
    return out


def markdown(report: dict) -> str:
    lines = [f"# {report['name']}", "", f"`{report['command']}`", "",
             (f"{report['device']}, torch {report['torch']}, Triton {report['triton']}, copy bandwidth "
              f"{report['copy_bandwidth'] / 1e12:.2f} TB/s."), "",
             ("Per GEMM (weight bytes over time as a fraction of the copy bandwidth; Triton: its best configuration "
              "BLOCK_N/BLOCK_K/warps/stages):"), "",
             "| shape | M x N x K | cuBLAS us | cuBLASLt us | Triton us (config) | cuBLAS | cuBLASLt | Triton |",
             "|---|---|---|---|---|---|---|---|"]
    best = best_triton(report["shapes"])
    for name, m, n, k, _ in SHAPES:
        lib = {r["backend"]: r for r in report["shapes"] if r["shape"] == name and r["backend"] != "triton"}
        tri = best[name]
        lines.append(f"| {name} | {m} x {n} x {k} | {lib['cublas']['us']:.2f} | {lib['cublaslt']['us']:.2f} | "
                     f"{tri['us']:.2f} ({'/'.join(map(str, tri['config']))}) | "
                     f"{lib['cublas']['bandwidth_fraction']:.0%} | {lib['cublaslt']['bandwidth_fraction']:.0%} | "
                     f"{tri['bandwidth_fraction']:.0%} |")
    lines += ["", ("The 1B batch-8 context-2k decode step (gpu_decode.decode_case; the first and last rows are both "
                   "cuBLAS, run before and after the others):"), "",
              "| backend | ms per step | roofline fraction |", "|---|---|---|"]
    lines += [f"| {r['backend']} | {r['decode_step_ms']:.4f} | {r['roofline_fraction']:.1%} |" for r in report["step"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.json and .md)")
    args = parser.parse_args()
    bandwidth = copy_bandwidth("cuda")
    shapes = shape_rows(bandwidth)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".shapes.json").write_text(json.dumps(shapes, indent=1))
    report = {"name": args.out.name, "command": "python " + " ".join(sys.argv),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "copy_bandwidth": bandwidth, "shapes": shapes, "step": step_rows(shapes)}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
