"""InfiniGen's alpha and partial-column ratio swept on SmolLM2-135M: the quality each setting gives against the full
cache (the quality suite's own text metrics: 2 windows of pytest_kvcache/data/evaluation.txt, 1024 prompt tokens,
64 teacher-forced), with the speculation's recall and the K/V bytes it copied to the device as a share of what fetching every cached
token would copy (infinigen:fetch_all=1, the dense layers included).

    python benchmarks/infinigen_sweep.py --out benchmarks/results/infinigen-sweep-cpu

Writes OUT.json and OUT.md (never over an existing file unless --force).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from pytest_kvcache import quality
from pytest_kvcache.engines.hf import HFEngine
from pytest_kvcache.models import load_model
from pytest_kvcache.quality_fixture import QualityRun, TextSetup, text_result
from pytest_kvcache.results import write_json_atomic
from pytest_kvcache.strategies import parse_strategy


def fetch_and_recall(model, label: str, window: list[int], prefill: int) -> tuple[float, int]:
    """(recall, K/V bytes copied to the device) of one label teacher-forced on one window."""
    engine = HFEngine(model, parse_strategy(label))
    engine.teacher_forced(window, prefill)
    return engine.cache.recall(), engine.cache.counters.bytes_to_device


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--alphas", default="2,5,10,20")
    parser.add_argument("--ratios", default="0.2,0.5,1.0")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    args = parser.parse_args()
    targets = [args.out.with_suffix(".json"), args.out.with_suffix(".md")]
    if not args.force and any(p.exists() for p in targets):
        parser.error(f"{targets[0]} exists: pass --force to overwrite it")
    torch.set_num_threads(int(os.environ.get("KV_THREADS", "2")))
    model = load_model("smollm2")
    run = QualityRun(model)
    setup = TextSetup()
    settings = [(a, r) for a, r in itertools.product(
        [float(x) for x in args.alphas.split(",")], [float(x) for x in args.ratios.split(",")])]
    labels = {s: f"infinigen:budget={args.budget:g},alpha={s[0]:g},partial_ratio={s[1]:g},track_recall=0"
              for s in settings}
    window = quality.text_windows(run.tokenize(quality.evaluation_text()), 1, setup.prefill + setup.continuation)[0]
    _, every = fetch_and_recall(model, "infinigen:fetch_all=1,track_recall=0", window, setup.prefill)
    rows = []
    start = time.perf_counter()
    for i, (setting, label) in enumerate(labels.items(), 1):
        run.text_scores(setup, [label])
        _, metrics, _ = text_result(run, label, setup)
        recall, copied = fetch_and_recall(model, label.replace("track_recall=0", "track_recall=1"), window,
                                          setup.prefill)
        fetched = copied / every
        rows.append({"alpha": setting[0], "partial_ratio": setting[1], "label": label,
                     "perplexity_ratio": metrics["perplexity_ratio"][0], "kl_divergence": metrics["kl_divergence"][0],
                     "top1_agreement": metrics["top1_agreement"][0], "recall": recall, "fetched_share": fetched})
        print(f"[{i}/{len(labels)}] {label}: ppl ratio {rows[-1]['perplexity_ratio']:.3f}, recall {recall:.3f}, "
              f"fetched {fetched:.3f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    command = "python benchmarks/infinigen_sweep.py " + " ".join(sys.argv[1:])
    doc = {"command": command, "model": model.name, "budget": args.budget, "setup": vars(setup),
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}
    write_json_atomic(targets[0], doc)
    table = tabulate([[r["alpha"], r["partial_ratio"], f"{r['perplexity_ratio']:.3f}", f"{r['kl_divergence']:.4f}",
                       f"{r['top1_agreement']:.3f}", f"{r['recall']:.3f}", f"{r['fetched_share']:.3f}"] for r in rows],
                     headers=["alpha", "partial ratio", "ppl ratio", "KL nats", "top-1 agr.", "recall",
                              "fetched share"], tablefmt="github", disable_numparse=True)
    within = [r for r in rows if r["perplexity_ratio"] <= 1.10]
    best = min(within, key=lambda r: r["fetched_share"]) if within else None
    verdict = (f"Within 10% of full perplexity with the least fetched: alpha {best['alpha']:g}, partial ratio "
               f"{best['partial_ratio']:g} (ratio {best['perplexity_ratio']:.3f}, fetches {best['fetched_share']:.1%})."
               if best else "No setting reached a perplexity ratio within 10% of full.")
    text = (f"# InfiniGen sweep on {model.name}, budget {args.budget:g}\n\n`{command}`\n\n"
            f"Quality as in suites/test_quality.py ({setup.windows} windows, {setup.prefill} prompt + "
            f"{setup.continuation} teacher-forced tokens); recall and fetched share (K/V bytes copied to the "
            "device over what infinigen:fetch_all=1 copies; the 2 dense layers always fetch everything) from the first "
            "window.\n\n" + table + "\n\n" + verdict + "\n")
    tmp = targets[1].with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(targets[1])
    print(text)
    return 0 if all(math.isfinite(r["perplexity_ratio"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
