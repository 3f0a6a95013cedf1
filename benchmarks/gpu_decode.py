"""How close the hf engine's CUDA decode step comes to the bandwidth roofline, and what eviction buys on a GPU.

Measures on one GPU, in bf16, with the engine's own code path (HFEngine.run: batched prefill, then decode steps
replayed from CUDA graphs and timed with CUDA events):
  1. the copy bandwidth (2 GiB device-to-device, bytes read + written): the roofline's denominator;
  2. full-cache decode: ms per step and roofline fraction = (weight bytes + valid KV bytes a step reads) / step
     time / copy bandwidth, for the issue's shapes (8B b1 ctx 2k, 8B b32 ctx 2k, 8B b32 ctx 8k, 1B b8 ctx 2k);
  3. a 20% KV budget at 8B, batch 32, context 8k: streaming and h2o decode tokens/s against the full cache's;
  4. decode attention alone over a ragged batch (8B layer: 32 query / 8 KV heads, d 128; batch 32, lengths uniform
     in 512-4096), and over the two small-batch shapes (8B layer at batch 1, 1B layer (d 64) at batch 8, length
     2048): the split-K kernel as the engine's captured step runs it (its configuration tuned for the shape) and
     with each candidate configuration, padded SDPA with a mask (and on the ragged batch FlexAttention), as a
     fraction of the bytes the valid KV needs per layer (each captured in a CUDA graph).

    python benchmarks/gpu_decode.py --out benchmarks/results/gpu-decode-h200   (writes .json and .md)
    python benchmarks/gpu_decode.py --only attention                           (one part)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

from pytest_kvcache import split_k
from pytest_kvcache.engines.hf import HFEngine
from pytest_kvcache.engines.roofline import copy_bandwidth, weight_bytes
from pytest_kvcache.models import load_model
from pytest_kvcache.split_k import graph_ms
from pytest_kvcache.strategies import parse_strategy
from pytest_kvcache.traces import Request, Trace

DECODE_CASES = [  # (model, batch, context, target fraction of the roofline from the issue)
    ("llama-8b", 1, 2048, 0.75),
    ("llama-8b", 32, 2048, 0.75),
    ("llama-8b", 32, 8192, 0.85),
    ("llama-1b", 8, 2048, 0.55),
]
BUDGET_CASE = ("llama-8b", 32, 8192)
BUDGET_TARGETS = {"streaming:budget=0.2": 1.9, "h2o:budget=0.2": 1.7}
STEPS = 64
PROFILE_CASES = [("llama-1b", "full", 8, 2048), ("llama-8b", "full", 1, 2048),
                 ("llama-8b", "streaming:budget=0.2", 32, 8192), ("llama-8b", "h2o:budget=0.2", 32, 8192)]


def burst(model, batch: int, context: int, steps: int = STEPS, seed: int = 0) -> Trace:
    """`batch` requests at t=0 whose contexts run from context - steps/2 to context + steps/2."""
    gen = torch.Generator().manual_seed(seed)
    prompt = context - steps // 2
    return Trace(tuple(
        Request(f"r{i}", 0.0, tuple(torch.randint(4, model.vocab_size, (prompt,), generator=gen).tolist()), steps)
        for i in range(batch)
    ))


def decode_case(model, strategy: str, batch: int, context: int) -> dict:
    """One replay of a burst through the engine: its decode-step median and roofline fraction (CUDA events)."""
    from pytest_kvcache import kernels

    engine = HFEngine(model, parse_strategy(strategy), max_batch=batch)
    trace = burst(model, batch, context)
    tuned_before, chosen_before = len(kernels.tuned_configs()), len(split_k.chosen_configs())
    engine.run(trace)  # set-up (cache, graphs, Triton compiles, attention and split-K tuning) and a first pass
    tuned = kernels.tuned_configs()[tuned_before:]
    at_batch = [c for c in tuned if c["rows_pow2"] == triton_pow2(batch)]
    started = time.perf_counter()
    result = engine.run(trace)
    wall = time.perf_counter() - started
    step_ms = result.extra["decode_step_ms"]
    out = {
        "model": model.name, "strategy": strategy, "batch": batch, "context": context, "steps": STEPS,
        "decode_step_ms": step_ms, "roofline_fraction": result.extra["roofline_fraction"],
        "decode_tok_s": batch / step_ms * 1e3, "replay_s": wall,
        "weight_bytes": weight_bytes(model), "kv_peak_bytes": result.counters.peak_resident_bytes,
        "attention_config": (f"{at_batch[-1]['CHUNK']}/{at_batch[-1]['BLOCK_N']}" if at_batch else "-"),
        "attention_configs_tuned": tuned, "projection_choices": split_k.chosen_configs()[chosen_before:],
    }
    del engine
    torch.cuda.empty_cache()
    return out


@contextlib.contextmanager
def cublas_projections():
    """The engine's step with its o and down projections on cuBLAS, as before split_k (for the A/B row)."""
    choose = split_k.choose
    split_k.choose = lambda *args, **kwargs: None
    try:
        yield
    finally:
        split_k.choose = choose


def projections(row: dict) -> str:
    """What ran the o and down projections of a decode case: cuBLAS, or split-K BLOCK_N/BLOCK_K/splits."""
    if "projections" in row:
        return row["projections"]
    if not row.get("projection_choices"):
        return "cuBLAS (batch > 16)" if row["batch"] > split_k.MAX_ROWS else "cuBLAS (tuned earlier)"
    parts = []
    for name, choice in zip(("o", "down"), row["projection_choices"]):
        us = choice["us_per_layer"]
        if choice["choice"] == "cublas":
            parts.append(f"{name} cuBLAS ({us.get('cublas', float('nan')):.1f} us)")
        else:
            c = choice["choice"]
            pick = f"{c['block_n']}/{c['block_k']}/{c['splits']}/{c['warps']}w/{c['stages']}s"
            parts.append(f"{name} {c['block_n']}/{c['block_k']}/{c['splits']} ({us.get(pick, float('nan')):.1f} us, "
                         f"cuBLAS {us.get('cublas', float('nan')):.1f})")
    return ", ".join(parts)


def triton_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def profile_step(model, strategy: str, batch: int, context: int, steps: int = 8) -> dict:
    """CUDA kernels of eager decode steps (the graph replays the same ones): launches per step and GPU time by
    kernel, to see where a step's time goes."""
    from pytest_kvcache.engines.decoder import routed_attention

    engine = HFEngine(model, parse_strategy(strategy), max_batch=batch)
    trace = burst(model, batch, context)
    plan = engine.plan_slots(trace)
    with torch.inference_mode():
        engine._setup(*plan)
        cache, decoder = engine.cache, engine.decoder
        with routed_attention(model):
            for slot, request in enumerate(trace.requests):
                cache.admit(slot, request)
            logits = decoder.prefill(list(range(batch)), [list(r.prompt_ids) for r in trace.requests])
        for slot, request in enumerate(trace.requests):
            cache.finish_prefill(slot, len(request.prompt_ids))
        tokens = logits.argmax(-1).tolist()
        graphs, decoder.graphs = decoder.graphs, {}
        tokens = decoder.decode(batch, tokens).tolist()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                tokens = decoder.decode(batch, tokens).tolist()
        decoder.graphs = graphs
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: -e.device_time_total)
    total_us = sum(e.device_time_total for e in kernels) / steps
    rows = [{"kernel": e.key[:90], "calls_per_step": e.count / steps, "us_per_step": e.device_time_total / steps}
            for e in kernels[:25]]
    del engine
    torch.cuda.empty_cache()
    return {"model": model.name, "strategy": strategy, "batch": batch, "context": context,
            "launches_per_step": sum(e.count for e in kernels) / steps, "gpu_us_per_step": total_us, "top": rows}


ATTENTION_CASES = [  # (name, query heads, KV heads, head dim, batch, lengths low-high, cells)
    ("ragged: 8B layer, batch 32, lengths 512-4096", 32, 8, 128, 32, (512, 4096), 4096),
    ("8B layer, batch 1, length 2048", 32, 8, 128, 1, (2048, 2048), 2080),
    ("1B layer, batch 8, length 2048", 32, 8, 64, 8, (2048, 2048), 2080),
]


def candidate_configs(dim: int) -> list:
    """What tuning chooses from at this head dim, and a few more, each timed alone (the decode cases use only the
    former): tiles of 128 keys and 8 warps."""
    import triton

    from pytest_kvcache import kernels

    extra = [triton.Config({"CHUNK": 512, "BLOCK_N": 128}, num_warps=4, num_stages=3),
             triton.Config({"CHUNK": 256, "BLOCK_N": 128}, num_warps=4, num_stages=2),
             triton.Config({"CHUNK": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
             triton.Config({"CHUNK": 256, "BLOCK_N": 128}, num_warps=8, num_stages=2),
             triton.Config({"CHUNK": 1024, "BLOCK_N": 64}, num_warps=4, num_stages=3)]
    tuned = list(kernels.ATTENTION_CONFIGS)
    seen = {_config_name(c) for c in tuned}
    return tuned + [c for c in extra if _config_name(c) not in seen]


def _config_name(config) -> str:
    return (f"CHUNK {config.kwargs['CHUNK']} / BLOCK_N {config.kwargs['BLOCK_N']}, {config.num_warps} warps, "
            f"{config.num_stages} stages")


def attention_case(bandwidth: float, name: str, q_heads: int, kv_heads: int, dim: int, batch: int,
                   span: tuple[int, int], cells: int, flex: bool) -> dict:
    """Decode attention of one layer: bytes the valid KV needs / time / bandwidth, for the kernel as the captured
    step runs it (tuned for the shape), with each candidate configuration, padded SDPA (+ FlexAttention)."""
    from pytest_kvcache import kernels
    from pytest_kvcache.engines.attention import KernelAttention
    from pytest_kvcache.strategies.base import AttendSpec

    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    lengths_list = torch.randint(span[0], span[1] + 1, (batch,), generator=gen).tolist()
    lengths = torch.tensor(lengths_list, device="cuda")
    keys = torch.randn(batch, kv_heads, cells, dim, device="cuda", dtype=dtype)
    values = torch.randn_like(keys)
    q = torch.randn(batch, q_heads, dim, device="cuda", dtype=dtype)
    valid_bytes = sum(lengths_list) * kv_heads * dim * 2 * 2
    scale = dim**-0.5
    mask = (torch.arange(cells, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]

    # as the engine's captured step runs it: tuned for this shape (timed at the full capacity) on its first call
    tuned = KernelAttention(batch, kv_heads, q_heads, dim, cells, torch.device("cuda"), want_probs=False, tuned=True)
    spec = AttendSpec(keys, values, lengths, max(lengths_list))
    tuned_before = len(kernels.tuned_configs())

    def split_k():
        return tuned(q, spec, scale)[0]

    def with_config(config):
        workspace = kernels.DecodeWorkspace(batch, kv_heads, q_heads // kv_heads, dim, cells, torch.device("cuda"))
        out = torch.empty_like(q)

        def run():
            kernels.decode_attention(q, keys, values, lengths, scale, workspace, out, config=config)
            return out

        return run

    def padded_sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask,
                                                                scale=scale, enable_gqa=True)

    variants = {"split-K Triton kernel (ours), tuned as in the captured step": split_k}
    for config in candidate_configs(dim):
        label = "split-K, " + _config_name(config)
        if config is kernels.DEFAULT_CONFIG:
            label += " (eager default)"
        elif config not in kernels.ATTENTION_CONFIGS:
            label += " (not among the tuned choices)"
        variants[label] = with_config(config)
    variants["padded SDPA + mask"] = padded_sdpa
    if flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def valid_cell(b, h, q_idx, kv_idx):
                return kv_idx < lengths[b]

            block_mask = create_block_mask(valid_cell, batch, None, 1, cells, device="cuda")
            compiled = torch.compile(flex_attention)

            def flex_attn():
                return compiled(q[:, :, None], keys, values, block_mask=block_mask, scale=scale, enable_gqa=True)

            variants["FlexAttention (compiled)"] = flex_attn
        except Exception as error:  # noqa: BLE001 - recorded as a result, the other variants still run
            variants["FlexAttention (compiled)"] = error
    reference = padded_sdpa()[:, :, 0].float()
    rows = []
    for label, fn in variants.items():
        if isinstance(fn, Exception):
            rows.append({"variant": label, "error": f"{type(fn).__name__}: {fn}"[:300]})
            continue
        try:
            out = fn()
            out = out[:, :, 0] if out.dim() == 4 else out
            error = float((out.float() - reference).norm() / reference.norm())
            ms = graph_ms(fn)
            rows.append({"variant": label, "ms": ms, "valid_kv_fraction": valid_bytes / (ms / 1e3) / bandwidth,
                         "relative_error_vs_sdpa": error})
        except Exception as failure:  # noqa: BLE001 - recorded as a result
            rows.append({"variant": label, "error": f"{type(failure).__name__}: {failure}"[:300]})
    return {"case": name, "valid_kv_bytes": valid_bytes, "rows": rows,
            "tuned_config": kernels.tuned_configs()[tuned_before:]}


def markdown(report: dict) -> str:
    lines = [f"# GPU decode on {report['gpu']}", "",
             f"`{report['command']}` ({report['created']}); torch {report['torch']}, bf16; copy bandwidth "
             f"{report['bandwidth_tb_s']:.2f} TB/s (read + written).", ""]
    if report.get("decode"):
        lines += ["## Full-cache decode step vs the bandwidth roofline", "",
                  ("| model | batch | context | ms/step | roofline | target | attention CHUNK/BLOCK_N (tuned) | "
                   "o, down: cuBLAS or split-K BLOCK_N/BLOCK_K/splits (us per layer with its add + RMSNorm) |"),
                  "|---|---|---|---|---|---|---|---|"]
        for row in report["decode"]:
            lines.append(f"| {row['model']} | {row['batch']} | {row['context']} | {row['decode_step_ms']:.3f} | "
                         f"{row['roofline_fraction']:.1%} | {row['target']:.0%} | {row.get('attention_config', '-')} | "
                         f"{projections(row)} |")
    if report.get("budget"):
        lines += ["", "## 20% KV budget (8B, batch 32, context 8k): decode tokens/s vs the full cache", "",
                  "| strategy | ms/step | decode tok/s | x full | target | attention CHUNK/BLOCK_N (tuned) |",
                  "|---|---|---|---|---|---|"]
        for row in report["budget"]:
            lines.append(f"| {row['strategy']} | {row['decode_step_ms']:.2f} | {row['decode_tok_s']:.0f} | "
                         f"{row['speedup']:.2f} | {row.get('target', '-')} | {row.get('attention_config', '-')} |")
    for entry in report.get("profile", []):
        lines += ["", f"## Profile: {entry['model']} {entry['strategy']} batch {entry['batch']} context "
                      f"{entry['context']} ({entry['launches_per_step']:.0f} launches, "
                      f"{entry['gpu_us_per_step']:.0f} us of kernels per eager step)", "",
                  "| kernel | calls/step | us/step |", "|---|---|---|"]
        lines += [f"| `{row['kernel']}` | {row['calls_per_step']:.0f} | {row['us_per_step']:.1f} |" for row in entry["top"]]
    for case in report.get("attention", []):
        lines += ["", f"## Decode attention, {case['case']}", "",
                  "| variant | us/layer | valid-KV bandwidth | rel. error vs SDPA |", "|---|---|---|---|"]
        for row in case["rows"]:
            if "error" in row:
                lines.append(f"| {row['variant']} | failed: {row['error']} | | |")
            else:
                lines.append(f"| {row['variant']} | {row['ms'] * 1e3:.1f} | {row['valid_kv_fraction']:.1%} | "
                             f"{row['relative_error_vs_sdpa']:.1e} |")
        if case["tuned_config"]:
            lines += ["", "Tuning chose " + ", ".join(
                f"CHUNK {c['CHUNK']} / BLOCK_N {c['BLOCK_N']} ({c['num_warps']} warps, {c['num_stages']} stages)"
                for c in case["tuned_config"]) + " (timed with every row at the full capacity)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu-decode", help="output path without suffix")
    parser.add_argument("--only", choices=["decode", "budget", "attention", "profile"], action="append",
                        help="run only these parts (repeatable; default: all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_decode.py needs a CUDA device", file=sys.stderr)
        return 2
    parts = args.only or ["decode", "budget", "attention"]  # profile only when asked
    bandwidth = copy_bandwidth("cuda")
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
              "created": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(["python"] + sys.argv),
              "bandwidth_tb_s": bandwidth / 1e12}
    models = {}

    def model(name):
        if name not in models:
            models.clear()
            torch.cuda.empty_cache()
            models[name] = load_model(name, "cuda")
        return models[name]

    if "profile" in parts:
        report["profile"] = []
        for name, strategy, batch, context in PROFILE_CASES:  # printed as each ends: a time limit keeps the first
            report["profile"].append(profile_step(model(name), strategy, batch, context))
            print(json.dumps(report["profile"][-1]), flush=True)
    if "decode" in parts:
        report["decode"] = []
        for name, batch, context, target in DECODE_CASES:
            row = decode_case(model(name), "full", batch, context)
            row["target"] = target
            report["decode"].append(row)
            print(json.dumps(row), flush=True)
        for name, batch, context, target in DECODE_CASES:  # the same step with cuBLAS o/down (split_k off)
            if batch <= split_k.MAX_ROWS:
                with cublas_projections():
                    row = decode_case(model(name), "full", batch, context)
                row["target"], row["projections"] = target, "cuBLAS (split-K off)"
                report["decode"].append(row)
                print(json.dumps(row), flush=True)
    if "budget" in parts:
        name, batch, context = BUDGET_CASE
        full = decode_case(model(name), "full", batch, context)
        full["speedup"] = 1.0
        report["budget"] = [full]
        for strategy, target in BUDGET_TARGETS.items():
            row = decode_case(model(name), strategy, batch, context)
            row["speedup"], row["target"] = full["decode_step_ms"] / row["decode_step_ms"], target
            report["budget"].append(row)
            print(json.dumps(row), flush=True)
    if "attention" in parts:  # after the decode cases: their engines tuned the shapes they share, as in a run
        report["attention"] = []
        for n, case in enumerate(ATTENTION_CASES):
            report["attention"].append(attention_case(bandwidth, *case, flex=n == 0))
            print(json.dumps(report["attention"][-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
