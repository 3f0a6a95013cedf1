"""Why kvbench compare interleaves rounds ABAB: two processes of the same code, measured in lockstep round by round.

    python benchmarks/interleaving.py run OUT.json --pairs 4 --rounds 4 --order abab   (busy neighbour: your own)
    python benchmarks/interleaving.py analyze OUT.json [OUT.json ...]

`run` starts pairs of worker processes (tiny model, the smoke selection's 8 strategies and trace: 8 requests of
384 -> 32 tokens, all at t=0), both pinned to one CPU, and lets only one replay at a time: per strategy, both set up
(engine + warm-up replay), then `--rounds` timed replays each, alternating. `--order abba`: the pair's two sides
swap at every round (A B B A ...), so a side often replays right after itself; `abab`: the same side leads at every
round of a pair (the leading side alternates between pairs). `analyze` prints, per file, the per-round paired
log-ratio spread and each pair's mean log ratio (side 1 / side 0) over all strategies: an A/A pair should be 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

STRATEGIES = ["full", "streaming:budget=0.2", "streaming:budget=0.5", "h2o:budget=0.2", "h2o:budget=0.5",
              "infinigen:budget=0.5", "quantized:bits=4", "paged"]


def worker(cpu: int) -> None:
    """One side: answers `setup I` (engine for strategy I + warm-up) and `round` (one timed replay: wall, cpu)."""
    import torch

    torch.set_num_threads(1)
    os.sched_setaffinity(0, {cpu})
    from pytest_kvcache.engines.hf import HFEngine
    from pytest_kvcache.models import load_model
    from pytest_kvcache.strategies import parse_strategy
    from pytest_kvcache.traces import TraceSpec, synthetic

    model = load_model("tiny")
    trace = synthetic(TraceSpec(num_requests=8, prompt_len=384, output_len=32, rate=math.inf, seed=3,
                                vocab_size=model.model.config.vocab_size))
    print("ready", flush=True)
    engine = None
    for line in sys.stdin:
        command = line.split()
        if command[0] == "setup":
            engine = HFEngine(model, parse_strategy(STRATEGIES[int(command[1])]), max_batch=8)
            engine.run(trace.head(4))
            print("ok", flush=True)
        else:
            cpu_s, start = time.process_time(), time.perf_counter()
            engine.run(trace)
            print(f"{time.perf_counter() - start} {time.process_time() - cpu_s}", flush=True)


def run(args: argparse.Namespace) -> int:
    out = []
    for p in range(args.pairs):
        sides = [subprocess.Popen([sys.executable, __file__, "worker", str(args.cpu)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
        for s in sides:
            assert s.stdout.readline().strip() == "ready"

        def ask(side, message):
            side.stdin.write(message + "\n")
            side.stdin.flush()
            return side.stdout.readline().strip()

        for si in range(len(STRATEGIES)):
            for s in sides:
                ask(s, f"setup {si}")
            for r in range(args.rounds):
                lead = (r + p) % 2 if args.order == "abba" else p % 2
                for k in (lead, 1 - lead):
                    wall, cpu_s = map(float, ask(sides[k], "round").split())
                    out.append({"p": p, "s": si, "r": r, "side": k, "wall": wall, "cpu": cpu_s, "t": time.time()})
        for s in sides:
            s.stdin.close()
            s.wait()
        with open(args.out + ".tmp", "w") as f:
            json.dump({"order": args.order, "rounds": out}, f)
        os.replace(args.out + ".tmp", args.out)
        print(f"pair {p + 1}/{args.pairs} done", file=sys.stderr, flush=True)
    return 0


def analyze(args: argparse.Namespace) -> int:
    for path in args.files:
        data = json.load(open(path))
        rows = [r for r in data["rounds"] if r["p"] not in args.exclude_pairs]
        pairs = sorted({r["p"] for r in rows})
        rounds = 1 + max(r["r"] for r in rows)
        wall = np.full((len(pairs), len(STRATEGIES), rounds, 2), np.nan)
        for r in rows:
            wall[pairs.index(r["p"]), r["s"], r["r"], r["side"]] = r["wall"]
        d = np.log(wall[..., 1]) - np.log(wall[..., 0])
        means = np.nanmean(d, axis=(1, 2))
        print(f"{path}: order {data['order']}, {len(pairs)} pairs x {len(STRATEGIES)} strategies x {rounds} rounds")
        print(f"  SD of a round's paired log ratio: {np.nanstd(d):.3f}")
        print(f"  per pair, mean log ratio side 1 / side 0 over all strategies: {np.round(means, 3).tolist()}"
              f" (mean {means.mean():+.3f})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker")
    w.add_argument("cpu", type=int)
    w.set_defaults(func=lambda a: worker(a.cpu) or 0)
    r = sub.add_parser("run")
    r.add_argument("out")
    r.add_argument("--pairs", type=int, default=4)
    r.add_argument("--rounds", type=int, default=4)
    r.add_argument("--order", choices=["abba", "abab"], default="abab")
    r.add_argument("--cpu", type=int, default=1, help="the CPU both sides are pinned to (default: 1)")
    r.set_defaults(func=run)
    a = sub.add_parser("analyze")
    a.add_argument("files", nargs="+")
    a.add_argument("--exclude-pairs", type=int, nargs="*", default=[], help="pairs to leave out (disturbed ones)")
    a.set_defaults(func=analyze)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
