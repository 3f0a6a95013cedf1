"""`kvbench`: compare two trees, diff results against the baselines of any branch, report, make or check traces.

Exit status: 0 ok, 1 at least one regression (diff, compare), 2 bad input (a missing or unusable file, an unknown
ref): one line on stderr.
"""

from __future__ import annotations

import argparse
import math
import signal
import subprocess
import sys
from pathlib import Path

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.results import Outcome, load_results, parse_baselines
from pytest_kvcache.traces import TraceSpec, load_jsonl, save_jsonl, synthetic

SMOKE_ARGS = ["suites/", "-m", "smoke", "--kv-rounds", "10"]  # test_decode's smoke strategies; at 5 rounds a
# planted 10% was found in 16 of 21 verdicts against 19 of 21 at 10 (gate-decode3-first5.md, gate-decode3.md)
SMOKE_PAIRS = (12, 28)  # initial and most pairs of a smoke compare: up to 20, a planted 10% was found in 59 of 69
# verdicts, up to 28 in 59 of 60, and 28 pairs took at most 547 s (gate-smoke-pooled.md, gate-smoke-pooled-28.md)
THOROUGH = (40, 80)  # --thorough: a bootstrap of the smoke selection finds a planted 5% in 94% of compares at 40
# pairs (benchmarks/results/gate-decode3.md)


def _baseline_text(ref: str, machine_id: str, suite: str, baselines: str) -> tuple[str | None, str]:
    """(a suite's baseline file text, where it came from), from a folder or a git ref (`main`, a commit)."""
    folder = Path(ref)
    if folder.is_dir():
        path = folder / machine_id / f"{suite}.json"
        return (path.read_text() if path.exists() else None), str(path)
    spec = f"{ref}:{baselines}/{machine_id}/{suite}.json"
    shown = subprocess.run(["git", "show", spec], capture_output=True, text=True, check=False)
    if shown.returncode == 0:
        return shown.stdout, spec
    check = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], capture_output=True, check=False)
    if check.returncode != 0:
        raise KVConfigError(f"{ref!r} is neither a folder nor a git ref in this repository")
    return None, spec


def cmd_diff(args: argparse.Namespace) -> int:
    """The pytest gate's verdicts, recomputed from a results file against the baselines of a ref or folder."""
    from pytest_kvcache.gate import SESSION_SD, gate
    from pytest_kvcache.report import summary_text
    from pytest_kvcache.results import REGRESSED

    results = load_results(Path(args.results))
    session_sd = float(results.session.get("session_sd", SESSION_SD))
    files = {}
    outcomes = []
    for o in results.outcomes:
        m = o.measurement
        if o.error is not None:
            outcomes.append(o)
            continue
        if m.suite not in files:
            text, where = _baseline_text(args.ref, results.machine_id, m.suite, args.baselines)
            files[m.suite] = parse_baselines(text, Path(where), f"baseline {where}")
        baseline = files[m.suite].measurement(m.test_id, m.suite)
        outcomes.append(Outcome(o.nodeid, m, gate(baseline, m, o.thresholds, session_sd), o.thresholds))
    if not any(f.entries for f in files.values()):
        raise KVConfigError(f"no baselines for machine {results.machine_id} at {args.ref}: nothing to compare "
                            "against (record them with --kv-update-baselines and commit them)")
    fmt = "github" if args.format == "markdown" else "simple"
    table, changes = summary_text(outcomes, fmt)
    print(f"### KV-cache benchmarks: {args.results} vs {args.ref} ({results.machine_id})\n")
    print(table)
    if changes:
        print("\n#### Changed metrics\n")
        print(changes)
    regressions = [o for o in outcomes if any(v.status == REGRESSED for v in o.verdicts)]
    print(f"\n{len(regressions)} regressed, {len(outcomes) - len(regressions)} not regressed")
    return 1 if regressions else 0


def cmd_show(args: argparse.Namespace) -> int:
    from pytest_kvcache.report import tables

    results = load_results(Path(args.results))
    print(f"{results.created} on {results.machine_id} ({results.machine.get('cpu')})")
    print(tables(results.outcomes))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pytest_kvcache.characterize import write_report

    sources = [(source, load_results(Path(source))) for source in args.results]
    path = write_report(sources, Path(args.output), args.force)
    print(f"wrote {path} and {path.parent / 'README.md'} ({sum(len(r.outcomes) for _, r in sources)} tests read)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pytest_kvcache.compare import Plan, compare

    pytest_args = list(args.pytest_args) or list(SMOKE_ARGS)
    if args.gpu and "--gpu" not in pytest_args:
        pytest_args.append("--gpu")
    pairs, max_pairs = (args.pairs, args.max_pairs)
    if args.thorough:
        pairs, max_pairs = max(pairs, THOROUGH[0]), max(max_pairs, THOROUGH[1])
    if max_pairs < pairs:
        raise KVConfigError(f"--max-pairs {max_pairs} is below --pairs {pairs}")
    env = {}
    for item in args.head_env:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise KVConfigError(f"--head-env expects NAME=VALUE, got {item!r}")
        env[name] = value
    plan = Plan(pairs, max_pairs, args.step, args.order, args.seed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up worktrees and sessions when killed
    return compare(Path.cwd(), args.base, args.head, pytest_args, plan, args.output, args.markdown, env,
                   lambda line: print(f"kvbench compare: {line}", file=sys.stderr, flush=True))


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


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compare", help="measure BASE and HEAD (default: the working tree) in pairs of sessions "
                                          "interleaved round by round on this machine; exit 1 if a test got slower "
                                          "(or worse, or an exact counter changed), 2 on bad input",
                          description=f"pytest arguments after `--` replace the smoke selection (default: {' '.join(SMOKE_ARGS)})")
    comp.add_argument("base", help="git ref to compare against (main, origin/main, a commit)")
    comp.add_argument("head", nargs="?", default=None, help="git ref to measure (default: the working tree)")
    comp.add_argument("--pairs", type=_positive, default=SMOKE_PAIRS[0],
                      help=f"pairs of sessions before the first verdict (default: {SMOKE_PAIRS[0]})")
    comp.add_argument("--max-pairs", type=_positive, default=SMOKE_PAIRS[1],
                      help=f"pairs to add up to while a test is unknown (default: {SMOKE_PAIRS[1]})")
    comp.add_argument("--step", type=_positive, default=4, help="pairs added per look (default: 4)")
    comp.add_argument("--thorough", action="store_true",
                      help=f"at least {THOROUGH[0]} pairs, up to {THOROUGH[1]}: for changes of about 5%% "
                           "(default: off)")
    comp.add_argument("--order", choices=["random", "abba"], default="random",
                      help="which side leads each pair's rounds (default: random, drawn from --seed; abba: "
                           "alternating between pairs)")
    comp.add_argument("--seed", type=int, default=0, help="seed of the session order (default: 0)")
    comp.add_argument("--gpu", action="store_true", help="pass --gpu to both sides' pytest (default: off)")
    comp.add_argument("--markdown", type=Path, default=None,
                      help="append the markdown report to this file, e.g. $GITHUB_STEP_SUMMARY (default: none)")
    comp.add_argument("--output", type=Path, default=None,
                      help="keep every session's results, logs and compare.json here (default: a temporary folder)")
    comp.add_argument("--head-env", action="append", default=[], metavar="NAME=VALUE",
                      help="environment variable for HEAD sessions only, e.g. to plant a slowdown in a benchmark")
    comp.set_defaults(func=cmd_compare)
    diff = sub.add_parser("diff", help="compare a results file with the baselines of a git ref or folder; exit 1 on regression")
    diff.add_argument("ref", help="git ref (main, origin/main, a commit) or a baselines folder")
    diff.add_argument("--results", default="results", help="results file or folder holding latest.json (default: results)")
    diff.add_argument("--baselines", default="baselines", help="baselines path inside the repository (default: baselines)")
    diff.add_argument("--format", choices=["markdown", "plain"], default="markdown", help="table style (default: markdown)")
    diff.set_defaults(func=cmd_diff)
    show = sub.add_parser("show", help="print the summary table of a results file")
    show.add_argument("results", nargs="?", default="results", help="results file or folder (default: results)")
    show.set_defaults(func=cmd_show)
    report = sub.add_parser(
        "report", help="characterization study: which strategy wins where, the claims, tables and plots, as "
                       "index.html (self-contained) and README.md",
        description="Reads results files (the characterization run, the quality run, ...) and writes DIR/index.html "
                    "(plots inlined, no other file needed) and DIR/README.md with the plots as PNG files beside "
                    "it. DIR is written whole or not at all; a non-empty DIR is refused unless --force.")
    report.add_argument("results", nargs="*", default=["results"], metavar="RESULTS",
                        help="results files or folders holding latest.json (default: results)")
    report.add_argument("-o", "--output", default="report", metavar="DIR", help="output folder (default: report)")
    report.add_argument("--force", action="store_true", help="replace a non-empty DIR (default: refuse)")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    extra: list[str] = []
    if argv[:1] == ["compare"] and "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    if args.command == "compare":
        args.pytest_args = extra
    try:
        return args.func(args)
    except KVConfigError as e:
        print(f"kvbench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
