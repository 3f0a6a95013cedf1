"""pytest plugin that says where a suite's time goes: per test, its set-up/call/teardown wall time and, inside the
call, the time spent in the engine's set-up (cache, graphs), in graph capture, in prefill, in attention tuning, in
the warm-up and in the timed rounds.

Load it with `-p benchmarks.suite_clock`; it appends one JSON line per test to $KVBENCH_CLOCK (default
suite-clock.jsonl) as soon as the test ends, so a session cut off by a time limit keeps every finished test. Nothing in
the product code knows about it: it wraps `HFEngine._setup`, `Decoder.capture`, `Decoder.prefill`,
`kernels._tuned_config`, `Bench.warmup` and `Bench.run_round` from outside. capture_s includes tune_s (tuning runs
in the warm-up before capture), and engine_setup_s includes capture_s.

    PYTEST_ADDOPTS="-p benchmarks.suite_clock" KVBENCH_CLOCK=clock.jsonl pytest suites/ --gpu
    python -m benchmarks.suite_clock clock.jsonl      # the markdown table per suite file
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections import defaultdict

VARIABLE = "KVBENCH_CLOCK"
_spent: dict[str, float] = defaultdict(float)
_counts: dict[str, int] = defaultdict(int)
_phases: dict[str, dict[str, float]] = {}


def _timed(owner, name: str, label: str, counts=None) -> None:
    """Replace owner.name by a wrapper that adds its wall time to _spent[label] and counts its calls under the same
    label (or, given counts, how much counts() grew during the call)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        before = counts() if counts else None
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _spent[label] += time.perf_counter() - start
            _counts[label] += (counts() - before) if counts else 1

    setattr(owner, name, wrapper)


def pytest_configure(config) -> None:
    from pytest_kvcache import bench, kernels
    from pytest_kvcache.engines import decoder, hf

    _timed(hf.HFEngine, "_setup", "engine_setup_s")
    _timed(decoder.Decoder, "capture", "capture_s")
    _timed(decoder.Decoder, "prefill", "prefill_s")
    _timed(kernels, "_tuned_config", "tune_s", counts=lambda: len(kernels.TUNED))
    _timed(bench.Bench, "warmup", "warmup_s")
    _timed(bench.Bench, "run_round", "rounds_s")


def pytest_runtest_logreport(report) -> None:
    _phases.setdefault(report.nodeid, {})[f"{report.when}_s"] = round(report.duration, 3)
    if report.when == "call" and report.outcome != "passed":
        _phases[report.nodeid]["outcome"] = report.outcome


def pytest_runtest_logfinish(nodeid: str, location) -> None:
    row = {"test": nodeid, **_phases.pop(nodeid, {}), **{k: round(v, 3) for k, v in _spent.items()},
           **{k.removesuffix("_s") + "_n": v for k, v in _counts.items()}, "ended": round(time.time(), 1)}
    _spent.clear()
    _counts.clear()
    with open(os.environ.get(VARIABLE, "suite-clock.jsonl"), "a") as out:
        out.write(json.dumps(row) + "\n")


COLUMNS = ("engine_setup_s", "capture_s", "tune_s", "tune_n", "prefill_s", "warmup_s", "rounds_s")


def summary(path: str) -> str:
    """A markdown table of a clock file: per suite file, tests run, wall seconds and the wrapped parts' sums."""
    from tabulate import tabulate

    files: dict[str, dict[str, float]] = {}
    with open(path) as lines:
        rows = [json.loads(line) for line in lines]
    for row in rows:
        wall = sum(row.get(f"{when}_s", 0.0) for when in ("setup", "call", "teardown"))
        if wall < 0.05:  # skipped
            continue
        total = files.setdefault(row["test"].split("::")[0], defaultdict(float))
        total["tests"] += 1
        total["wall_s"] += wall
        for column in COLUMNS:
            total[column] += row.get(column, 0)
    table = [[name, int(t["tests"]), *(round(t[c], 1) for c in ("wall_s", *COLUMNS))] for name, t in files.items()]
    table.append(["all", *(round(sum(r[i] for r in table), 1) for i in range(1, 3 + len(COLUMNS)))])
    return tabulate(table, headers=["file", "tests", "wall_s", *COLUMNS], tablefmt="github")


if __name__ == "__main__":
    import sys

    print(summary(sys.argv[1] if len(sys.argv) > 1 else os.environ.get(VARIABLE, "suite-clock.jsonl")))
