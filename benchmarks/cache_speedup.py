"""What a KV cache buys: the same greedy generation with the full cache and with none (strategy `none`, which
recomputes attention over the whole sequence every step), at a shape close to the seed material's GPT-Neo-1.3B
(9.28 s without a cache, 3.19 s with one): SmolLM2-135M on CPU, the random-weight Llama-1B shape on GPU.

    python benchmarks/cache_speedup.py --out benchmarks/results/cache-speedup-cpu        (CPU, SmolLM2)
    python benchmarks/cache_speedup.py --gpu --out benchmarks/results/cache-speedup-h200  (GPU, llama-1b)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pytest_kvcache.engines.hf import HFEngine
from pytest_kvcache.models import load_model
from pytest_kvcache.quality import first_divergence
from pytest_kvcache.results import write_json_atomic
from pytest_kvcache.strategies import parse_strategy
from pytest_kvcache.traces import Request, Trace


def generation(model, strategy: str, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Wall seconds of one request's replay (prefill + new_tokens greedy tokens), median of `repeats` after a
    warm-up, and the tokens it produced."""
    gen = torch.Generator().manual_seed(0)
    prompt = tuple(torch.randint(4, model.vocab_size, (prompt_len,), generator=gen).tolist())
    trace = Trace((Request("r0", 0.0, prompt, new_tokens),))
    engine = HFEngine(model, parse_strategy(strategy), max_batch=1)
    engine.run(trace)
    seconds, tokens = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = engine.run(trace)
        seconds.append(time.perf_counter() - start)
        tokens = result.records[0].output_ids
    return {"strategy": strategy, "seconds": statistics.median(seconds), "rounds": seconds, "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="llama-1b on CUDA in bf16 (default: SmolLM2 on CPU)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: 128)")
    parser.add_argument("--new-tokens", type=int, default=256, help="generated tokens (default: 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed replays per strategy (default: 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on CPU (default: 1; two threads thrash on a busy 2-core machine)")
    parser.add_argument("--out", required=True, help="output path without suffix (.json and .md are written)")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.force and any(out.with_suffix(x).exists() for x in (".json", ".md")):
        parser.error(f"{out.with_suffix('.json')} exists: pass --force to overwrite it")
    if args.gpu and not torch.cuda.is_available():
        print("cache_speedup.py --gpu needs a CUDA device", file=sys.stderr)
        return 2
    if not args.gpu:
        torch.set_num_threads(args.threads)
    name, device = ("llama-1b", "cuda") if args.gpu else ("smollm2", "cpu")
    model = load_model(name, device)
    rows = [generation(model, s, args.prompt_len, args.new_tokens, args.repeats) for s in ("full", "none")]
    full, none = rows
    report = {
        "command": " ".join(["python"] + sys.argv), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": name, "device": torch.cuda.get_device_name() if args.gpu else platform.processor() or "cpu",
        "dtype": str(model.dtype), "threads": torch.get_num_threads(), "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "rows": rows, "none_over_full": none["seconds"] / full["seconds"],
        "agreeing_tokens": first_divergence(full["tokens"], none["tokens"]),
    }
    report["same_tokens"] = report["agreeing_tokens"] == len(full["tokens"])
    write_json_atomic(out.with_suffix(".json"), report)
    table = "\n".join([
        f"# What a KV cache buys: {name} on {report['device']} ({report['dtype']})", "",
        (f"`{report['command']}` ({report['created']}): one request, {args.prompt_len} prompt tokens, "
         f"{args.new_tokens} greedy tokens, median of {args.repeats} replays."), "",
        "| strategy | seconds | tokens/s |", "|---|---|---|",
        *[f"| {r['strategy']} | {r['seconds']:.2f} | {args.new_tokens / r['seconds']:.1f} |" for r in rows], "",
        (f"none / full = {report['none_over_full']:.2f}x; same greedy tokens: {report['same_tokens']} "
         f"(the first {report['agreeing_tokens']} of {len(full['tokens'])} agree)"), "",
    ])
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(table)
    tmp.replace(out.with_suffix(".md"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
