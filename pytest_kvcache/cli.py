"""`kvbench`: inspect results, diff them against baselines of any branch, and make or check trace files.

Exit status: 0 ok, 1 at least one regression (diff), 2 bad input (missing/corrupt file, unknown ref).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from pytest_kvcache.baselines import REGRESSED, BaselineError, Measurement, compare
from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.report import Outcome, changes_table, tables
from pytest_kvcache.traces import TraceSpec, load_jsonl, save_jsonl, synthetic


def _load_results(path: Path) -> dict:
    if path.is_dir():
        path = path / "latest.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise KVConfigError(f"no results at {path}: run `pytest suites/` first (it writes results/latest.json)") from None
    except json.JSONDecodeError as e:
        raise KVConfigError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if data.get("format") != 1:
        raise KVConfigError(f"{path} is not a pytest-kvcache results file of format 1")
    return data


def _measurements(results: dict) -> list[tuple[str, Measurement]]:
    return [
        (o["nodeid"], Measurement.from_entry(o["test_id"], o["suite"], o["entry"], results["machine"]))
        for o in results["outcomes"]
    ]


def _baseline_text(ref: str, machine_id: str, suite: str, baselines: str) -> str | None:
    """A suite's baseline file from a folder, or from a git ref (`main`, `origin/main`, a commit)."""
    folder = Path(ref)
    if folder.is_dir():
        path = folder / machine_id / f"{suite}.json"
        return path.read_text() if path.exists() else None
    spec = f"{ref}:{baselines}/{machine_id}/{suite}.json"
    shown = subprocess.run(["git", "show", spec], capture_output=True, text=True)
    if shown.returncode == 0:
        return shown.stdout
    check = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], capture_output=True)
    if check.returncode != 0:
        raise KVConfigError(f"{ref!r} is neither a folder nor a git ref in this repository")
    return None


def cmd_diff(args: argparse.Namespace) -> int:
    results = _load_results(Path(args.results))
    machine_id = results["machine_id"]
    cache: dict[str, dict] = {}
    outcomes = []
    for nodeid, current in _measurements(results):
        if current.suite not in cache:
            text = _baseline_text(args.ref, machine_id, current.suite, args.baselines)
            try:
                cache[current.suite] = json.loads(text) if text else {"entries": {}, "machine": {}}
            except json.JSONDecodeError as e:
                raise BaselineError(f"baseline {current.suite}.json at {args.ref} is corrupt ({e.msg})") from None
        data = cache[current.suite]
        entry = data["entries"].get(current.test_id)
        baseline = Measurement.from_entry(current.test_id, current.suite, entry, data.get("machine", {})) if entry else None
        outcomes.append(Outcome(current, compare(baseline, current), nodeid))
    fmt = "github" if args.format == "markdown" else "simple"
    print(f"### KV-cache benchmarks: {args.results} vs {args.ref} ({machine_id})\n")
    print(tables(outcomes, fmt))
    changes = changes_table(outcomes, fmt)
    if changes:
        print("\n#### Changed metrics\n")
        print(changes)
    regressions = [o for o in outcomes if any(v.status == REGRESSED for v in o.verdicts)]
    print(f"\n{len(regressions)} regressed, {len(outcomes) - len(regressions)} not regressed")
    return 1 if regressions else 0


def cmd_show(args: argparse.Namespace) -> int:
    results = _load_results(Path(args.results))
    from pytest_kvcache.baselines import Verdict

    outcomes = [
        Outcome(m, [Verdict(**v) for v in o["verdicts"]], nodeid, o.get("updated", False))
        for (nodeid, m), o in zip(_measurements(results), results["outcomes"])
    ]
    print(f"{results['created']} on {results['machine_id']} ({results['machine'].get('cpu')})")
    print(tables(outcomes))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pytest_kvcache.characterize import write_report

    measurements = []
    for source in args.results:
        measurements += [m for _, m in _measurements(_load_results(Path(source)))]
    path = write_report(measurements, Path(args.output), ", ".join(args.results))
    print(f"wrote {path} ({len(measurements)} measurements)")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    rate = math.inf if args.rate == "inf" else float(args.rate)
    spec = TraceSpec(num_requests=args.num_requests, rate=rate, burstiness=args.burstiness, prompt_len=args.prompt_len,
                     output_len=args.output_len, range_ratio=args.range_ratio,
                     shared_prefix_len=args.shared_prefix_len, vocab_size=args.vocab_size, seed=args.seed)
    save_jsonl(synthetic(spec), args.output)
    print(f"wrote {spec.num_requests} requests to {args.output}")
    return 0


def cmd_check_trace(args: argparse.Namespace) -> int:
    trace = load_jsonl(args.path, vocab_size=args.vocab_size)
    span = trace.requests[-1].arrival_s - trace.requests[0].arrival_s
    print(f"{args.path}: {len(trace)} requests over {span:.2f} s, longest context {trace.max_context_tokens} tokens")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    diff = sub.add_parser("diff", help="compare a results file with the baselines of a git ref or folder; exit 1 on regression")
    diff.add_argument("ref", help="git ref (main, origin/main, a commit) or a baselines folder")
    diff.add_argument("--results", default="results", help="results file or folder holding latest.json (default: results)")
    diff.add_argument("--baselines", default="baselines", help="baselines path inside the repository (default: baselines)")
    diff.add_argument("--format", choices=["markdown", "plain"], default="markdown", help="table style (default: markdown)")
    diff.set_defaults(func=cmd_diff)
    show = sub.add_parser("show", help="print the summary table of a results file")
    show.add_argument("results", nargs="?", default="results", help="results file or folder (default: results)")
    show.set_defaults(func=cmd_show)
    report = sub.add_parser("report", help="characterization report: tables per suite and plots against budget")
    report.add_argument("results", nargs="*", default=["results"],
                        help="results files or folders holding latest.json (default: results)")
    report.add_argument("-o", "--output", default="report", help="output folder (default: report)")
    report.set_defaults(func=cmd_report)
    trace = sub.add_parser("trace", help="write a seeded synthetic trace as JSONL")
    trace.add_argument("-o", "--output", required=True, help="file to write")
    trace.add_argument("--num-requests", type=int, default=16, help="requests (default: 16)")
    trace.add_argument("--rate", default="4", help="requests per second, or 'inf' for all at t=0 (default: 4)")
    trace.add_argument("--burstiness", type=float, default=1.0, help="gamma shape, 1 = Poisson (default: 1)")
    trace.add_argument("--prompt-len", type=int, default=128, help="mean prompt tokens (default: 128)")
    trace.add_argument("--output-len", type=int, default=32, help="mean output tokens (default: 32)")
    trace.add_argument("--range-ratio", type=float, default=0.0, help="length spread, uniform +-ratio (default: 0)")
    trace.add_argument("--shared-prefix-len", type=int, default=0, help="tokens shared by all prompts (default: 0)")
    trace.add_argument("--vocab-size", type=int, default=1024, help="token ids drawn below this (default: 1024, tiny model)")
    trace.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    trace.set_defaults(func=cmd_trace)
    check = sub.add_parser("check-trace", help="validate a JSONL trace file")
    check.add_argument("path", help="trace file")
    check.add_argument("--vocab-size", type=int, default=None, help="also check token ids are below this")
    check.set_defaults(func=cmd_check_trace)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KVConfigError as e:
        print(f"kvbench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
