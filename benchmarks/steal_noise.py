"""How much of a round's wall-clock spread on this runner is time the hypervisor took the vCPU away (steal).

    python benchmarks/steal_noise.py [--rounds 60] [--cpu 0] [--name steal-noise]

Pinned to one CPU with one torch thread, it times rounds of a fixed matmul loop and reads, per round, the wall
time, this process's CPU time and the steal time /proc/stat counts for that CPU. It writes
benchmarks/results/cpu/NAME.md and NAME.json (refusing to overwrite them).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pytest_kvcache.results import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results" / "cpu"
MATMULS = 400  # a round of about 0.15 s on this machine type


def steal_s(cpu: int) -> float:
    """Seconds of steal /proc/stat has counted for `cpu` (USER_HZ ticks)."""
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith(f"cpu{cpu} "):
                return int(line.split()[8]) / os.sysconf("SC_CLK_TCK")
    raise SystemExit(f"cpu{cpu} is not in /proc/stat")


def measure(rounds: int, cpu: int) -> list[dict[str, float]]:
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    out = []
    for _ in range(rounds):
        stolen, wall, own = steal_s(cpu), time.perf_counter(), time.process_time()
        for _ in range(MATMULS):
            a @ a
        out.append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - own,
                    "steal_s": steal_s(cpu) - stolen})
    return out


def spread(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.1f} ({min(values) * 1e3:.1f}-{max(values) * 1e3:.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--name", default="steal-noise")
    args = parser.parse_args()
    md, js = RESULTS / f"{args.name}.md", RESULTS / f"{args.name}.json"
    if md.exists() or js.exists():
        print(f"{md} or {js} exists: pass another --name", file=sys.stderr)
        return 2
    rows = measure(args.rounds, args.cpu)
    wall = [r["wall_s"] for r in rows]
    steal = [r["steal_s"] for r in rows]
    net = [r["wall_s"] - r["steal_s"] for r in rows]
    cpu = [r["cpu_s"] for r in rows]
    corr = statistics.correlation(wall, steal) if len(set(steal)) > 1 else float("nan")
    text = "\n".join([
        f"# {args.name}", "",
        (f"`python benchmarks/steal_noise.py --rounds {args.rounds} --cpu {args.cpu} --name {args.name}`: "
         f"{args.rounds} rounds of {MATMULS} 256x256 matmuls, pinned to CPU {args.cpu}, one torch thread."), "",
        "| per round | median (min-max) ms |", "|---|---|",
        f"| wall | {spread(wall)} |", f"| steal on that CPU (/proc/stat) | {spread(steal)} |",
        f"| wall - steal | {spread(net)} |", f"| process CPU time | {spread(cpu)} |", "",
        f"Correlation of wall time with steal: {corr:.3f}. Steal is counted in 10 ms ticks.", ""])
    write_json_atomic(js, {"rounds": rows, "correlation": None if math.isnan(corr) else corr})
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, md)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
