"""A/A and power experiments for `kvbench compare`, on this machine, with a competing busy process on one core.

    python benchmarks/gate_experiments.py collect DATA --blocks N [--variants A,B,S05,S10,S20] [-- PYTEST_ARGS]
    python benchmarks/gate_experiments.py analyze DATA [DATA ...] --name NAME
    python benchmarks/gate_experiments.py timed OUT --slowdown 0.1 [-- PYTEST_ARGS]

`collect` checks out HEAD twice (as `kvbench compare HEAD HEAD` does) and runs one long sequence of blocks through
compare's own runner, fork server and turn-taking while `python3 -c 'while True: pass'` keeps one core busy all
along. A block is one pair as compare runs it: a session of A and one of another variant at once, interleaved round
by round, the leading side drawn; the other variants take turns, each once per cycle in a drawn order (a variant
named twice in --variants comes twice per cycle: A/A compares run to the most pairs, so they need more). A and B are
plain sessions of the two checkouts, Sxx are sessions of the second checkout whose decode step is planted xx%
slower (benchmarks/plant_slowdown.py, through KVBENCH_PLANT_SLOWDOWN). Every session's per-round values are appended
to DATA/sessions.jsonl, so a run can be stopped and resumed; a finished run is committed packed (`gzip -9
DATA/sessions.jsonl`: the runs' records are 40 MB as text, more than a device call carries beside the tree), and
`analyze` reads either form.

`analyze` forms the pairs (A, B) for A/A and (A, Sxx) for power from the blocks, and cuts each stream into
disjoint groups of consecutive pairs, each judged by compare's own adaptive rule and verdicts (kvbench compare's
smoke defaults); it writes benchmarks/results/NAME.md and NAME.json. `timed` runs one real `kvbench compare` with
a planted slowdown and records its wall time and verdicts.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import psutil
from scipy.stats import binomtest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pytest_kvcache.cli import SMOKE_ARGS, SMOKE_PAIRS
from pytest_kvcache.compare import (
    ForkServer,
    Judgement,
    Plan,
    Runner,
    judge_test,
    resolve,
    sequential,
    worktree,
)
from pytest_kvcache.gate import pair_log_ratio, pair_speed_ratio, round_speeds
from pytest_kvcache.results import Measurement
from pytest_kvcache.stats import min_pairs, remove_covariate
from pytest_kvcache.turns import Conductor

RESULTS = ROOT / "benchmarks" / "results"
NOISE_METRICS = ("tpot_ms", "e2e_ms", "cpu_ms_per_token")
PROJECTED_ROUNDS = 10  # the noise table projects a pair of this many interleaved rounds
VARIABLE = "KVBENCH_PLANT_SLOWDOWN"
INDEX = "sessions.jsonl"  # appended to while a run goes on
PACKED = f"{INDEX}.gz"  # the same records once the run is packed for the repository


def variant_env(name: str) -> dict[str, str]:
    """A, B: plain; S05, S10, S20: decode step planted 5%, 10%, 20% slower."""
    return {VARIABLE: f"{int(name[1:]) / 100:g}"} if name.startswith("S") else {}


def busy_neighbour() -> subprocess.Popen:
    return subprocess.Popen(["python3", "-c", "while True: pass"])


def busy_seconds() -> float:
    """CPU seconds all CPUs have spent busy since boot."""
    return sum(t.user + t.system + t.nice + t.irq + t.softirq for t in psutil.cpu_times(percpu=True))


def own_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def foreign_cores(neighbour: psutil.Process, seconds: float = 1.0) -> float:
    """CPUs kept busy by processes other than the experiment's neighbour, over a short look."""
    busy, own = busy_seconds(), own_seconds(neighbour)
    time.sleep(seconds)
    return (busy_seconds() - busy - (own_seconds(neighbour) - own)) / seconds


def wait_until_quiet(neighbour: psutil.Process, limit: float, max_wait_s: float) -> tuple[float, float]:
    """Hold the next block while other processes (not ours) keep more than `limit` CPUs busy, for at most
    `max_wait_s`: the experiment's condition is one busy neighbour, not three. The neighbour is stopped while
    nothing is measured, so the wait does not slow the others down. Returns (waited s, last foreign)."""
    start = time.monotonic()
    held = False
    while True:
        foreign = foreign_cores(neighbour)
        if foreign <= limit or time.monotonic() - start >= max_wait_s:
            if held:  # a second for the neighbour to be busy again before the block starts
                neighbour.resume()
                time.sleep(1)
            return time.monotonic() - start, foreign
        neighbour.suspend()
        held = True
        time.sleep(20)


def compact(session) -> dict:
    """What analysis needs from a session: per test, the configuration hash and every metric's samples."""
    tests = {}
    for o in session.results.outcomes if session.results else []:
        m = o.measurement
        tests[m.test_id] = {"config_hash": m.config_hash, "thresholds": o.thresholds, "metrics": m.metrics,
                            "calibration_s": m.calibration_s, "calibration_points_s": m.info.get("calibration_points_s"),
                            "cpus": m.info.get("cpus"), "repeated": m.info.get("disturbed_rounds_repeated"),
                            "still": m.info.get("still_disturbed")}
    return {"returncode": session.returncode, "seconds": round(session.seconds, 2), "tests": tests}


def cmd_collect(args: argparse.Namespace) -> int:
    data = Path(args.data).resolve()  # a session changes into its tree before it opens its log (forkserver._child)
    data.mkdir(parents=True, exist_ok=True)
    index = data / INDEX
    if (data / PACKED).exists():
        raise SystemExit(f"{data / PACKED} is a finished, packed run: gunzip it to resume the run")
    done = read_index(data)
    complete = {r["block"] for r in done}
    variants = args.variants.split(",")
    pytest_args = args.pytest_args or [*SMOKE_ARGS, "-p", "benchmarks.plant_slowdown"]
    commit = resolve(ROOT, "HEAD")
    setup = data / "setup.json"
    before = json.loads(setup.read_text()) if setup.exists() else {}
    commits = before.get("commits") or ([{"commit": before["commit"], "from_block": 0}] if "commit" in before else [])
    setup.write_text(json.dumps({"variants": variants, "pytest_args": pytest_args,  # a resumed run adds its commit
                                 "commits": [*commits, {"commit": commit, "from_block": len(complete)}]},
                                indent=1) + "\n")
    rng = random.Random(args.seed)
    heads = [v for v in variants if v != "A"]
    plan = []  # (head variant, leading session) per block: every head once per cycle, in a drawn order
    while len(plan) < args.blocks:
        plan += [(head, rng.choice(["A", head])) for head in rng.sample(heads, len(heads))]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # remove the worktrees when stopped
    neighbour = busy_neighbour()
    watched = psutil.Process(neighbour.pid)
    start = time.monotonic()
    try:
        with ExitStack() as stack:
            trees = {"base": stack.enter_context(worktree(ROOT, commit, data / "tree-a")),
                     "head": stack.enter_context(worktree(ROOT, commit, data / "tree-b"))}
            server = ForkServer()
            stack.push(lambda kind, *_: server.close(interrupted=kind is not None))
            conductor = Conductor(seed=args.seed)
            stack.callback(conductor.close)
            runner = Runner(trees, pytest_args, data / "sessions", server, conductor)
            with index.open("a") as out:
                for block, (head, lead) in enumerate(plan[:args.blocks]):
                    if block in complete:
                        continue
                    while (data / "pause").exists():  # `touch DATA/pause` holds the run between blocks
                        time.sleep(10)
                    waited, before = wait_until_quiet(watched, args.quiet_below, args.max_wait)
                    runner.env = {head: variant_env(head)}
                    first = [lead, "A" if lead == head else head]
                    busy, own = busy_seconds(), own_seconds(watched)
                    sessions = runner.together(block, {"A": "base", head: "head"}, first)
                    seconds = max(s.seconds for s in sessions.values())
                    cpu = sum(s.cpu_s for s in sessions.values())
                    foreign = busy_seconds() - busy - (own_seconds(watched) - own) - cpu
                    for position, name in enumerate(first):
                        record = {"block": block, "position": position, "variant": name, "waited_s": round(waited),
                                  "foreign_before": round(before, 2),
                                  "foreign_cores": round(max(foreign, 0.0) / seconds, 3),
                                  "loadavg": os.getloadavg()[0], **compact(sessions[name])}
                        out.write(json.dumps(record) + "\n")
                    out.flush()
                    elapsed = time.monotonic() - start
                    print(f"block {block + 1}/{args.blocks} (A vs {head}) done, {elapsed:.0f} s", file=sys.stderr,
                          flush=True)
    finally:
        neighbour.kill()
        neighbour.wait()
    return 0


def read_index(folder: Path) -> list[dict]:
    """A run's session records: sessions.jsonl while it runs, sessions.jsonl.gz once packed for the repository."""
    if (folder / PACKED).exists():
        with gzip.open(folder / PACKED, "rt") as packed:
            return [json.loads(line) for line in packed]
    index = folder / INDEX
    return [json.loads(line) for line in index.read_text().splitlines()] if index.exists() else []


def load(folders: list[str]) -> dict[str, dict[int, dict]]:
    """variant -> block -> session record, over every DATA folder (blocks renumbered to stay distinct)."""
    out: dict[str, dict[int, dict]] = {}
    offset = 0
    for folder in folders:
        records = read_index(Path(folder))
        if not records:
            raise SystemExit(f"{folder}: no {INDEX} or {PACKED} with records")
        for r in records:
            out.setdefault(r["variant"], {})[offset + r["block"]] = r
        offset += 1 + max(r["block"] for r in records)
    return out


def disturbed(record: dict) -> bool:
    """compare's rule (Session.disturbed): some test's final round still waited for a CPU."""
    return any(t["still"] for t in record["tests"].values())


def measurements(record: dict, rounds: int | None) -> dict[str, tuple[Measurement, dict]]:
    """test id -> (Measurement of that session, thresholds); `rounds` keeps only the first rounds' samples."""
    out = {}
    for test_id, t in record["tests"].items():
        metrics = {n: v[:rounds] if rounds else v for n, v in t["metrics"].items()}
        points = t.get("calibration_points_s") or []
        info = {"calibration_points_s": points[:rounds + 1] if rounds else points}
        m = Measurement(test_id, "", {"hash": t["config_hash"]}, metrics, None, info=info)
        out[test_id] = (m, t["thresholds"])
    return out


def pair_stream(sessions: dict[str, dict[int, dict]], base: str, head: str, rounds: int | None) -> list[tuple]:
    """(base session, head session) of every block that has both, in block order, as measurements; pairs with a
    disturbed session are left out, as compare replaces them."""
    blocks = sorted(b for b in set(sessions[base]) & set(sessions[head])
                    if not disturbed(sessions[base][b]) and not disturbed(sessions[head][b]))
    return [(measurements(sessions[base][b], rounds), measurements(sessions[head][b], rounds)) for b in blocks]


def judge_pairs(pairs: list[tuple], alpha: float, seed: int = 0) -> list[Judgement]:
    tests = sorted(set.intersection(*(set(b) & set(h) for b, h in pairs)))
    return [judge_test(t, [b[t][0] for b, _ in pairs], [h[t][0] for _, h in pairs], pairs[-1][1][t][1], alpha, seed)
            for t in tests]


def groups(pairs: list[tuple], plan: Plan) -> list[tuple[int, list[Judgement]]]:
    """Disjoint consecutive groups, each judged by compare's adaptive rule: (pairs used, verdicts) per group."""
    out, start = [], 0
    while start + plan.max_pairs <= len(pairs):
        used: dict[str, int] = {}

        def judge(n: int, first: int = start, used: dict = used) -> list[Judgement]:
            used["n"] = n
            return judge_pairs(pairs[first:first + n], plan.alpha_per_look, seed=first)

        verdicts = sequential(plan, judge)
        out.append((used["n"], verdicts))
        start += used["n"]
    return out


def test_ratios(pairs: list[tuple], test_id: str, name: str, calibrated: bool) -> tuple[list[tuple], np.ndarray, float]:
    """One test's pairs that measured `name` (base, head measurements), their per-pair log ratios as the gate forms
    them (calibrated: less their slope on the calibration's ratio, gate.paired) or raw, and that slope."""
    sides = [(b[test_id][0], h[test_id][0]) for b, h in pairs
             if test_id in b and test_id in h and name in b[test_id][0].metrics and name in h[test_id][0].metrics]
    d = np.array([[pair_log_ratio(base.metrics[name], head.metrics[name])] for base, head in sides])
    shifts = [pair_speed_ratio(base, head) for base, head in sides]
    if not calibrated or not sides or None in shifts:
        return sides, d[:, 0] if sides else d, 0.0
    adjusted, slopes = remove_covariate(d, shifts)
    return sides, adjusted[:, 0], slopes[0]


def ratio_spread(pairs: list[tuple], name: str, calibrated: bool = True) -> tuple[float, float]:
    """Medians over tests of the SD of one metric's per-pair log ratios as the gate forms them (or raw) and of the
    calibration slope it removed (gate.paired; 0 for raw ratios)."""
    sds, slopes = [], []
    for test_id in pairs[0][0]:
        _, d, slope = test_ratios(pairs, test_id, name, calibrated)
        slopes.append(slope)
        if len(d) > 2:
            sds.append(float(np.std(d, ddof=1)))
    return (float(np.median(sds)) if sds else math.nan), (float(np.median(slopes)) if slopes else math.nan)


def noise_parts(pairs: list[tuple], name: str) -> dict[str, float]:
    """Where a pair's noise comes from (medians over tests, adjusted for the calibration as the gate does): `round`
    the SD of one round-by-round log ratio around its pair's mean, `pair` the SD of the per-pair log ratio,
    `between` what is left of it once the rounds' share (round**2 / rounds) is taken out: the part that more rounds
    per pair cannot shrink."""
    parts: dict[str, list[float]] = {"round": [], "pair": [], "between": [], "rounds": []}
    for test_id in pairs[0][0]:
        sides, d, slope = test_ratios(pairs, test_id, name, calibrated=True)
        same = [i for i, (base, head) in enumerate(sides) if len(base.metrics[name]) == len(head.metrics[name]) > 1]
        if len(same) < 3:
            continue
        within = []
        for i in same:
            base, head = sides[i]
            r = np.log(head.metrics[name]) - np.log(base.metrics[name])
            sb, sh = round_speeds(base), round_speeds(head)
            if slope and sb is not None and sh is not None:
                r = r - slope * (np.asarray(sh) - np.asarray(sb))
            within.append(np.var(r, ddof=1))
        rounds = float(np.mean([len(sides[i][0].metrics[name]) for i in same]))
        round_sd = float(np.sqrt(np.mean(within)))
        pair = float(np.std(d[same], ddof=1))
        parts["round"].append(round_sd)
        parts["pair"].append(pair)
        parts["between"].append(math.sqrt(max(pair**2 - round_sd**2 / rounds, 0.0)))
        parts["rounds"].append(rounds)
    return {k: float(np.median(v)) if v else math.nan for k, v in parts.items()}


def share_interval(k: int, n: int) -> tuple[float, float]:
    """Exact (Clopper-Pearson) 95% interval of a share of k in n verdicts: 0 of 200 A/A verdicts bounds the false
    alarm rate below 1.8%, not at 0."""
    if n == 0:
        return math.nan, math.nan
    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    return float(ci.low), float(ci.high)


def resampled_power(pairs: list[tuple], n: int, trials: int, alpha: float, seed: int) -> float:
    """Share of 'slower' test verdicts of fixed-size compares of n pairs drawn with replacement (bootstrap)."""
    rng = np.random.default_rng(seed)
    slower = total = 0
    for _ in range(trials):
        sample = [pairs[i] for i in rng.integers(len(pairs), size=n)]
        verdicts = judge_pairs(sample, alpha, seed=int(rng.integers(1 << 30)))
        slower += sum(v.word == "slower" for v in verdicts)
        total += len(verdicts)
    return slower / total


def cmd_analyze(args: argparse.Namespace) -> int:
    sessions = load(args.data)
    plan = Plan(SMOKE_PAIRS[0], args.max_pairs or SMOKE_PAIRS[1], 4, "random", 0)
    rounds = args.rounds
    rows, report = [], {"data": args.data, "rounds": rounds or "all",
                        "plan": {"pairs": plan.pairs, "max_pairs": plan.max_pairs, "step": plan.step,
                                 "alpha": plan.alpha}, "comparisons": {}}
    seconds = [r["seconds"] for v in sessions.values() for r in v.values()]
    heads = sorted((v for v in sessions if v != "A"), key=lambda v: (v != "B", v))  # A/A first, then by slowdown
    for head in heads:
        pairs = pair_stream(sessions, "A", head, rounds)
        judged = groups(pairs, plan)
        words = [v.word for _, vs in judged for v in vs]
        counts = {w: words.count(w) for w in sorted(set(words))}
        slower = counts.get("slower", 0)
        sd_names = ("tpot_ms", "itl_ms", "e2e_ms", "cpu_ms_per_token", "output_throughput", "ttft_ms")
        adjusted = {name: ratio_spread(pairs, name) for name in sd_names}
        sd, slope = ({name: v[i] for name, v in adjusted.items()} for i in (0, 1))
        raw_sd = {name: ratio_spread(pairs, name, calibrated=False)[0] for name in sd_names}
        looked = pairs[:plan.pairs]
        first_look = [v.word for v in judge_pairs(looked, plan.alpha_per_look)] if len(looked) >= min_pairs() else []
        entry = {"label": "A/A" if head == "B" else f"planted {int(head[1:])}% slower decode", "pairs": len(pairs),
                 "first_look": {w: first_look.count(w) for w in sorted(set(first_look))}, "first_look_pairs": len(looked),
                 "compares": len(judged), "pairs_per_compare": [n for n, _ in judged], "verdicts": len(words),
                 "counts": counts, "slower_share": slower / len(words) if words else math.nan,
                 "slower_share_ci95": share_interval(slower, len(words)),
                 "log_ratio_sd": sd, "raw_log_ratio_sd": raw_sd, "calibration_slope": slope, "noise_parts": {name: noise_parts(pairs, name) for name in NOISE_METRICS}}
        if args.thorough_trials and len(pairs) >= 2:  # too few blocks for disjoint groups: bootstrap the same plan
            entry["resampled_slower_share"] = {n: resampled_power(pairs, n, args.thorough_trials, plan.alpha, seed=n)
                                               for n in (plan.pairs, plan.max_pairs)}
        report["comparisons"][head] = entry
        rows.append(entry)
    if "S05" in sessions and args.thorough_trials:
        pairs = pair_stream(sessions, "A", "S05", rounds)
        curve = {n: resampled_power(pairs, n, args.thorough_trials, plan.alpha, seed=n)
                 for n in (12, 20, 30, 40, 50, 60, 80)}
        report["power_5_percent_by_pairs"] = curve
    report["session_seconds"] = {"median": float(np.median(seconds)), "max": float(np.max(seconds))}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(report, args))
    print(markdown(report, args))
    return 0


def markdown(report: dict, args: argparse.Namespace) -> str:
    trials = f" --thorough-trials {args.thorough_trials}" if args.thorough_trials else ""
    rounds = f" --rounds {args.rounds}" if args.rounds else ""
    most = f" --max-pairs {args.max_pairs}" if args.max_pairs else ""
    command = (f"`python benchmarks/gate_experiments.py analyze {' '.join(args.data)} --name {args.name}{rounds}{most}{trials}`"
               + (f" (first {args.rounds} rounds of each session)" if args.rounds else ""))
    plan = "kvbench compare's smoke plan" if not args.max_pairs else f"the smoke plan with --max-pairs {args.max_pairs}"
    design = (f"Each compare: {plan}, {report['plan']['pairs']} pairs, up to "
              f"{report['plan']['max_pairs']} while a test is unknown; disjoint groups of consecutive pairs of one "
              "long run with `python3 -c 'while True: pass'` on one core all along, each pair two sessions "
              "interleaved round by round as compare runs them. Median pair "
              f"{report['session_seconds']['median']:.1f} s (max {report['session_seconds']['max']:.1f} s).")
    lines = [f"# {args.name}", "", command, "", design, "",
             "| comparison | compares | pairs used | test verdicts | slower | share slower (95% interval) | other verdicts |",
             "|---|---|---|---|---|---|---|"]
    for head, e in report["comparisons"].items():
        others = ", ".join(f"{n} {w}" for w, n in e["counts"].items() if w != "slower") or "-"
        lines.append(f"| {e['label']} ({head}) | {e['compares']} | {sum(e['pairs_per_compare'])} | {e['verdicts']} | "
                     f"{e['counts'].get('slower', 0)} | {e['slower_share']:.1%} ({e['slower_share_ci95'][0]:.1%}-"
                     f"{e['slower_share_ci95'][1]:.1%}) | {others} |" if e["verdicts"] else
                     f"| {e['label']} ({head}) | 0 | - | 0 | - | - | fewer than {report['plan']['max_pairs']} pairs |")
    lines += ["", (f"The first look of a compare (its first {report['plan']['pairs']} usable pairs, or all there are, at "
                   "the first look's error rate; a real compare adds pairs while a test is unknown):"), "",
              "| comparison | pairs | test verdicts |", "|---|---|---|"]
    lines += [f"| {e['label']} ({head}) | {e['first_look_pairs']} | "
              + (", ".join(f"{n} {w}" for w, n in e["first_look"].items()) or "-") + " |"
              for head, e in report["comparisons"].items()]
    sd_names = list(next(iter(report["comparisons"].values()))["log_ratio_sd"])
    lines += ["", ("SD of the per-pair log ratio (median over tests), as the gate forms it (less its slope on the ratio of "
                   "the two processes' calibrations) and, after the slash, from the raw times:"), "",
              "| comparison | " + " | ".join(sd_names) + " |", "|---|" + "---|" * len(sd_names)]
    for head, e in report["comparisons"].items():
        lines.append(f"| {head} | " + " | ".join(f"{e['log_ratio_sd'][n]:.3f} / {e['raw_log_ratio_sd'][n]:.3f}"
                                               for n in sd_names) + " |")
    lines += ["", "The calibration slope the gate removed (median over tests):", "",
              "| comparison | " + " | ".join(sd_names) + " |", "|---|" + "---|" * len(sd_names)]
    lines += [f"| {head} | " + " | ".join(f"{e['calibration_slope'][n]:.2f}" for n in sd_names) + " |"
              for head, e in report["comparisons"].items()]
    lines += ["", ("Where a pair's noise comes from (log scale, median over tests): the SD of one round's ratio around "
                   "its pair's mean, the SD of the pair's ratio, and the part of it between pairs (process offsets) once "
                   "the rounds' share (round SD^2 / rounds) is taken out; the last column projects a pair of "
                   f"{PROJECTED_ROUNDS} interleaved rounds (sqrt(between^2 + round^2 / {PROJECTED_ROUNDS})):"), "",
              f"| comparison | metric | rounds | round | pair | between pairs | pair of {PROJECTED_ROUNDS} rounds |", "|---|---|---|---|---|---|---|"]
    for head, e in report["comparisons"].items():
        for name, p in e["noise_parts"].items():
            if math.isnan(p["rounds"]):  # sessions of one round, or too few pairs
                continue
            projected = math.sqrt(p["between"] ** 2 + p["round"] ** 2 / PROJECTED_ROUNDS)
            lines.append(f"| {head} | {name} | {p['rounds']:.0f} | {p['round']:.3f} | {p['pair']:.3f} | "
                         f"{p['between']:.3f} | {projected:.3f} |")
    resampled = {h: e["resampled_slower_share"] for h, e in report["comparisons"].items()
                 if "resampled_slower_share" in e}
    if resampled:
        sizes = list(next(iter(resampled.values())))
        lines += ["", ("Share of `slower` test verdicts of fixed-size compares whose pairs are drawn with replacement "
                       "from each stream (a bootstrap: an estimate from few blocks, not independent compares; a draw "
                       "repeats pairs, which understates the spread, so these shares overstate the power and the A/A "
                       "rate alike):"), "",
                  "| comparison | " + " | ".join(f"{n} pairs" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
        lines += [f"| {report['comparisons'][h]['label']} ({h}) | " + " | ".join(f"{v[n]:.1%}" for n in sizes) + " |"
                  for h, v in resampled.items()]
    if "power_5_percent_by_pairs" in report:
        note = ("Power at a planted 5% slowdown against the number of pairs (fixed-size compares of pairs drawn "
                "with replacement from the S05 stream):")
        lines += ["", note, "", "| pairs | share slower |", "|---|---|"]
        lines += [f"| {n} | {p:.1%} |" for n, p in report["power_5_percent_by_pairs"].items()]
    return "\n".join(lines) + "\n"


def cmd_timed(args: argparse.Namespace) -> int:
    """One real kvbench compare HEAD HEAD with a planted slowdown in the head, under a busy neighbour."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pytest_args = args.pytest_args or [*SMOKE_ARGS, "-p", "benchmarks.plant_slowdown"]
    command = [sys.executable, "-m", "pytest_kvcache.cli", "compare", "HEAD", "HEAD", "--output", str(out / "run"),
               "--markdown", str(out / "compare.md"), "--head-env", f"{VARIABLE}={args.slowdown}", "--", *pytest_args]
    neighbour = busy_neighbour()
    watched = psutil.Process(neighbour.pid)
    busy, own = busy_seconds(), own_seconds(watched)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    try:
        code = subprocess.run(command, cwd=ROOT, check=False).returncode
        seconds = time.monotonic() - start
        done = resource.getrusage(resource.RUSAGE_CHILDREN)
        compare_cpu = done.ru_utime + done.ru_stime - children.ru_utime - children.ru_stime
        foreign = (busy_seconds() - busy - (own_seconds(watched) - own) - compare_cpu) / seconds
    finally:
        neighbour.kill()
        neighbour.wait()
    summary = json.loads((out / "run" / "compare.json").read_text())
    record = {"command": " ".join(command[1:]), "exit": code, "wall_s": round(seconds, 1),
              "foreign_cores": round(max(foreign, 0.0), 2),
              "pairs": len(summary["orders"]), "verdicts": {t["test_id"]: t["verdict"] for t in summary["tests"]}}
    (out / "timed.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


def main() -> int:
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    collect = sub.add_parser("collect")
    collect.add_argument("data")
    collect.add_argument("--blocks", type=int, required=True)
    collect.add_argument("--variants", default="A,B,S05,S10,S20")
    collect.add_argument("--seed", type=int, default=0)
    collect.add_argument("--quiet-below", type=float, default=0.3,
                         help="start a block only when others keep fewer CPUs busy than this (default: 0.3)")
    collect.add_argument("--max-wait", type=float, default=900, help="longest wait for that, seconds (default: 900)")
    collect.set_defaults(func=cmd_collect)
    analyze = sub.add_parser("analyze")
    analyze.add_argument("data", nargs="+")
    analyze.add_argument("--name", required=True)
    analyze.add_argument("--rounds", type=int, default=None, help="use only the first N rounds of each session")
    analyze.add_argument("--max-pairs", type=int, default=None,
                         help="judge with the smoke plan's first look but up to N pairs while a test is unknown "
                              "(what a longer smoke compare would tell; default: the smoke plan's own)")
    analyze.add_argument("--thorough-trials", type=int, default=0, help="bootstrap compares per pair count at 5%%")
    analyze.set_defaults(func=cmd_analyze)
    timed = sub.add_parser("timed")
    timed.add_argument("out")
    timed.add_argument("--slowdown", type=float, default=0.1)
    timed.set_defaults(func=cmd_timed)
    args = parser.parse_args(argv)
    args.pytest_args = extra
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
