"""`kvbench compare BASE [HEAD]`: both trees measured in the same job, in interleaved pairs, judged pair by pair.

BASE (and HEAD, else the working tree) are checked out as git worktrees. Each session is one pytest process run in
its side's tree (PYTHONPATH pointing at it), writing results to a temporary folder, with no stored baselines, pinned
to one CPU by the plugin. The two sessions of a pair run at once but take turns (turns.py): the turn passes before
every timed round, so each round of a test runs right after the other side's same round and slow drifts of the
machine's speed fall on both alike. Which side leads in each pair is drawn at random (or alternates: --order abba),
and every order is recorded. Each test and metric is judged from one log ratio per pair (gate.pair_log_ratio: the
mean of its round-by-round ratios, less its slope on the two processes' calibration ratio, gate.paired;
stats.paired_log_effects, through the one gate): same / slower / faster / unknown
with the change and its interval; exact counters must match (`changed`). While some test is unknown, pairs are
added up to --max-pairs; the error rate is split over the looks. A pair in which a session's rounds kept waiting
for a CPU (other processes took it) is left out and measured again, up to twice --max-pairs pairs in all.

Exit status: 0 nothing got slower (or worse, or changed), 1 something did, 2 bad input.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.gate import paired
from pytest_kvcache.metrics import metric
from pytest_kvcache.results import (
    IMPROVED,
    MISSING,
    NEW,
    NOT_COMPARABLE,
    REGRESSED,
    UNCHANGED,
    UNKNOWN,
    FormatError,
    Measurement,
    Results,
    Verdict,
    load_results,
)
from pytest_kvcache.stats import ALPHA, min_pairs
from pytest_kvcache.turns import Conductor

SLOWER, FASTER, SAME, CHANGED, WORSE, BETTER = "slower", "faster", "same", "changed", "worse", "better"
FAILING = (SLOWER, CHANGED, WORSE)
TEST_ORDER = (NOT_COMPARABLE, SLOWER, CHANGED, WORSE, FASTER, BETTER, UNKNOWN, SAME)


def word(v: Verdict) -> str:
    """A metric verdict in compare's words: slower/faster/same/unknown; changed (exact); worse/better (others)."""
    kind = metric(v.metric).kind
    if v.status == REGRESSED:
        return SLOWER if metric(v.metric).statistical else CHANGED if kind == "exact" else WORSE
    if v.status == IMPROVED:
        return FASTER if metric(v.metric).statistical else BETTER
    return {UNCHANGED: SAME}.get(v.status, v.status)


@dataclass
class Judgement:
    """One test across all pairs: its word, the metric that decided it, and every metric's verdict."""

    test_id: str
    word: str
    verdicts: list[Verdict]
    pairs: int

    @property
    def deciding(self) -> Verdict | None:
        ranked = [v for v in self.verdicts if word(v) == self.word]
        return max(ranked, key=lambda v: abs(v.change or 0.0)) if ranked else None


def judge_test(test_id: str, base: list[Measurement], head: list[Measurement], thresholds: dict[str, float],
               alpha: float, seed: int) -> Judgement:
    verdicts = paired(base, head, thresholds, alpha, seed)
    words = {word(v) for v in verdicts if v.status not in (NEW, MISSING)}
    verdict = next((w for w in TEST_ORDER if w in words), SAME)
    return Judgement(test_id, verdict, verdicts, len(base))


@dataclass
class Session:
    """One pytest process of one side."""

    side: str
    pair: int
    results: Results | None
    returncode: int
    seconds: float
    log: Path
    cpu_s: float = 0.0

    @property
    def disturbed(self) -> bool:
        """Some test's round kept waiting for a CPU after its retries: other processes took this session's CPU."""
        return self.results is not None and any(o.measurement.info.get("still_disturbed") for o in self.results.outcomes)


@dataclass
class Run:
    """Everything measured so far: sessions in order, and the order drawn for each pair."""

    base_label: str
    head_label: str
    pytest_args: list[str]
    sessions: list[Session] = field(default_factory=list)
    orders: list[list[str]] = field(default_factory=list)

    def pairs(self) -> list[tuple[Session, Session]]:
        by_pair: dict[int, dict[str, Session]] = {}
        for s in self.sessions:
            by_pair.setdefault(s.pair, {})[s.side] = s
        return [(p["base"], p["head"]) for _, p in sorted(by_pair.items()) if len(p) == 2]

    def usable(self) -> list[tuple[Session, Session]]:
        """The pairs neither of whose sessions was disturbed: the samples (a disturbed pair is replaced)."""
        return [(b, h) for b, h in self.pairs() if not (b.disturbed or h.disturbed)]


def tests_of(session: Session) -> dict[str, tuple[Measurement, dict[str, float]]]:
    """test id -> (measurement, thresholds) for the tests of a session that produced a measurement."""
    if session.results is None:
        return {}
    return {o.measurement.test_id: (o.measurement, o.thresholds) for o in session.results.outcomes
            if o.error is None and o.measurement.metrics}


def verdicts(run: Run, alpha: float, seed: int = 0, pairs: list[tuple[Session, Session]] | None = None
             ) -> tuple[list[Judgement], list[str], list[str]]:
    """(test verdicts, tests only on base, tests only on head) from the given pairs (default: the usable ones)."""
    pairs = run.usable() if pairs is None else pairs
    base = [tests_of(b) for b, _ in pairs]
    head = [tests_of(h) for _, h in pairs]
    on_base = set().union(*base) if base else set()
    on_head = set().union(*head) if head else set()
    out = []
    for test_id in sorted(on_base & on_head):
        both = [(b[test_id], h[test_id]) for b, h in zip(base, head) if test_id in b and test_id in h]
        thresholds = both[-1][1][1]
        out.append(judge_test(test_id, [b[0] for b, _ in both], [h[0] for _, h in both], thresholds, alpha, seed))
    return out, sorted(on_base - on_head), sorted(on_head - on_base)


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise KVConfigError(f"git {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:] or ['?']}")
    return done.stdout.strip()


def resolve(repo: Path, ref: str) -> str:
    """The commit a ref names; a one-line error when it names none."""
    done = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise KVConfigError(f"{ref!r} is not a commit of the repository at {repo}")
    return done.stdout.strip()


@contextmanager
def worktree(repo: Path, commit: str, folder: Path) -> Iterator[Path]:
    """A detached worktree of `commit`, removed afterwards."""
    _git(repo, "worktree", "add", "--detach", "--quiet", str(folder), commit)
    try:
        yield folder
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(folder)], capture_output=True, check=False)
        subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True, check=False)


class ForkServer:
    """The fork server process (forkserver.py): one pytest session per request, all forked from one parent."""

    def __init__(self) -> None:
        script = Path(__file__).with_name("forkserver.py")
        self.process = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, start_new_session=True)
        if json.loads(self.process.stdout.readline() or "{}").get("ready") is not True:
            self.close()
            raise KVConfigError(f"the compare fork server ({script}) did not start")

    def start(self, requests: list[dict]) -> None:
        """Fork these sessions ({"tree", "args", "env", "log"} each) at once; `finish` waits for them."""
        self.process.stdin.write(json.dumps({"sessions": requests}) + "\n")
        self.process.stdin.flush()

    def finish(self) -> list[tuple[int, float]]:
        """(pytest's exit status, CPU seconds) of each session `start` forked, once all have ended."""
        answer = json.loads(self.process.stdout.readline())
        return [(int(a["returncode"]), float(a["cpu_s"])) for a in answer["sessions"]]

    def close(self, interrupted: bool = False) -> None:
        """Let the server finish, or, when the compare was interrupted, end it and the session it runs (its own
        process group, started here)."""
        if interrupted:
            os.killpg(self.process.pid, signal.SIGTERM)
        self.process.stdin.close()
        self.process.wait()


@dataclass
class Runner:
    """Runs sessions through one fork server, several at a time taking turns (turns.Conductor); `env` adds
    variables to the sessions of one name."""

    trees: dict[str, Path]
    pytest_args: list[str]
    out: Path
    server: ForkServer
    conductor: Conductor
    env: dict[str, dict[str, str]] = field(default_factory=dict)

    def args(self, results: Path) -> list[str]:
        empty = self.out / "no-baselines"
        empty.mkdir(parents=True, exist_ok=True)
        return [*self.pytest_args, "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning",
                "--benchmark-disable", "--kv-results", str(results), "--kv-baselines", str(empty)]

    def together(self, pair: int, members: dict[str, str], first: list[str]) -> dict[str, Session]:
        """One session per member (name -> side), forked at once and measured turn by turn: each timed round of a
        test runs next to the other sessions' same round. `first`: the order of the first turns."""
        folders = {name: self.out / f"pair{pair:03d}-{name}" for name in members}
        logs = {name: self.out / f"pair{pair:03d}-{name}.log" for name in members}
        requests = [{"tree": str(self.trees[side]), "args": self.args(folders[name]), "log": str(logs[name]),
                     "env": {**self.env.get(name, {}), **self.conductor.env(name)}}
                    for name, side in members.items()]
        start = time.monotonic()
        self.server.start(requests)
        try:
            self.conductor.conduct(list(members), first)
        except (TimeoutError, OSError) as e:
            self.server.finish()
            raise KVConfigError(f"pair {pair}: {e}: {_tail(next(iter(logs.values())))}") from None
        answers = self.server.finish()
        seconds = time.monotonic() - start
        out = {}
        for (name, side), (code, cpu) in zip(members.items(), answers):
            try:
                results = load_results(folders[name]) if (folders[name] / "latest.json").exists() else None
            except FormatError as e:
                raise KVConfigError(f"{side} ({self.trees[side]}) writes results this version cannot read: {e}"
                                    ) from None
            out[name] = Session(side, pair, results, code, seconds, logs[name], cpu)
        return out


def _tail(log: Path, lines: int = 5) -> str:
    return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])


@dataclass
class Plan:
    """How many pairs, in which order, at which error rate."""

    pairs: int
    max_pairs: int
    step: int
    order: str
    seed: int
    alpha: float = ALPHA

    @property
    def most_measured(self) -> int:
        """Pairs measured at most, disturbed ones included: a disturbed pair is replaced, but not without end."""
        return 2 * self.max_pairs

    @property
    def looks(self) -> int:
        return 1 + -(-(self.max_pairs - self.pairs) // self.step)

    @property
    def alpha_per_look(self) -> float:
        return self.alpha / self.looks

    def order_of(self, pair: int, rng: random.Random) -> list[str]:
        if self.order == "abba":
            return ["base", "head"] if pair % 2 == 0 else ["head", "base"]
        return rng.sample(["base", "head"], 2)


def sequential(plan: Plan, judge: Callable[[int], list[Judgement]]) -> list[Judgement]:
    """The adaptive rule: verdicts after plan.pairs pairs, then every plan.step pairs while some test is unknown,
    up to plan.max_pairs. `judge(n)` returns the verdicts of the first n pairs (measuring them if needed)."""
    n = plan.pairs
    while True:
        tests = judge(n)
        unknown = sum(t.word == UNKNOWN for t in tests)
        if not unknown or n >= plan.max_pairs:
            return tests
        n = min(plan.max_pairs, n + plan.step)


def run_pairs(runner: Runner, plan: Plan, run: Run, progress) -> list[Judgement]:
    """Alternate sessions pair by pair, with the adaptive rule deciding how many pairs."""
    rng = random.Random(plan.seed)
    start = time.monotonic()

    def judge(n: int) -> list[Judgement]:
        while len(run.usable()) < n and len(run.orders) < plan.most_measured:
            pair = len(run.orders)
            order = plan.order_of(pair, rng)
            run.orders.append(order)
            sessions = runner.together(pair, {"base": "base", "head": "head"}, order)
            for side in order:
                session = sessions[side]
                run.sessions.append(session)
                if session.results is None:
                    raise KVConfigError(f"the {side} session wrote no results (pytest exit {session.returncode}): "
                                        f"{_tail(session.log)}")
            done, usable, elapsed = pair + 1, len(run.usable()), time.monotonic() - start
            left = f"; {done - usable} disturbed by other processes, replaced" if done > usable else ""
            progress(f"pair {done} done ({usable}/{n} usable, max {plan.max_pairs}{left}) in {elapsed:.0f} s; "
                     f"ETA {elapsed / done * max(n - usable, 0):.0f} s")
        tests = verdicts(run, plan.alpha_per_look, plan.seed)[0]
        unknown = sum(t.word == UNKNOWN for t in tests)
        if unknown and n < plan.max_pairs:
            progress(f"{unknown} tests unknown after {n} pairs: adding pairs")
        return tests

    return sequential(plan, judge)


def _change(v: Verdict | None) -> tuple[str, str]:
    if v is None or v.change is None:
        return "-", "-"
    if v.low is None or v.high is None or v.high == float("inf"):
        return f"{v.change:+.1%}", "-"
    return f"{v.change:+.1%}", f"[{v.low - 1:+.1%}, {v.high - 1:+.1%}]"


def report(run: Run, tests: list[Judgement], only_base: list[str], only_head: list[str], plan: Plan,
           fmt: str) -> str:
    """The verdict table plus notes: markdown for a PR comment (fmt 'github') or plain for the terminal."""
    rows = []
    for t in tests:
        deciding = t.deciding
        change, interval = _change(deciding)
        rows.append([t.test_id, t.word, deciding.metric if deciding else "-", change, interval, t.pairs])
    table = tabulate(rows, headers=["test", "verdict", "metric", "change", f"{1 - plan.alpha:.0%} interval", "pairs"],
                     tablefmt=fmt, disable_numparse=True)
    counts = {w: sum(t.word == w for t in tests) for w in TEST_ORDER}
    summary = ", ".join(f"{n} {w}" for w, n in counts.items() if n)
    cpus = sorted({c for s in run.sessions if s.results for o in s.results.outcomes
                   for c in o.measurement.info.get("cpus", []) if c is not None})
    orders = " ".join("".join(side[0].upper() for side in order) for order in run.orders)
    disturbed = len(run.pairs()) - len(run.usable())
    left_out = f" ({disturbed} more were disturbed by other processes and left out)" if disturbed else ""
    intro = (f"{len(tests)} tests: {summary or 'none'}. {len(run.usable())} pairs of sessions{left_out} "
             f"(`pytest {' '.join(run.pytest_args)}`), each pair interleaved round by round, leading side "
             f"{plan.order} (seed {plan.seed}): {orders}; "
             f"CPUs {cpus or 'not pinned'}. Thresholds are each test's; a verdict other than unknown needs >= "
             f"{min_pairs(plan.alpha_per_look)} pairs (error rate {plan.alpha:g} per test over its metrics and "
             f"{plan.looks} look{'s' if plan.looks > 1 else ''}).")
    lines = [f"### kvbench compare: {run.head_label} vs {run.base_label}", "", intro, "", table]
    notes = []
    for t in tests:
        for v in t.verdicts:
            if word(v) in (CHANGED, WORSE, NOT_COMPARABLE):
                notes.append(f"- {t.test_id}: {v.metric} {word(v)}: {v.detail}")
                if word(v) == NOT_COMPARABLE:
                    break
    notes += [f"- removed (only on {run.base_label}): {t}" for t in only_base]
    notes += [f"- added (only on {run.head_label}): {t}" for t in only_head]
    failed = [s for s in run.sessions if s.returncode != 0]
    if failed:
        which = ", ".join(f"{s.side} pair {s.pair} ({s.log.name})" for s in failed[:5])
        notes.append(f"- {len(failed)} sessions exited non-zero (a test failed): {which}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def summary_json(run: Run, tests: list[Judgement], plan: Plan) -> dict:
    """compare.json: the order, every session's file and timing, and every verdict."""
    return {
        "base": run.base_label, "head": run.head_label, "pytest_args": run.pytest_args,
        "plan": {"pairs": plan.pairs, "max_pairs": plan.max_pairs, "step": plan.step, "order": plan.order,
                 "seed": plan.seed, "alpha": plan.alpha, "looks": plan.looks},
        "orders": run.orders,
        "sessions": [{"side": s.side, "pair": s.pair, "returncode": s.returncode, "seconds": round(s.seconds, 2),
                      "cpu_s": round(s.cpu_s, 2), "disturbed": s.disturbed, "log": s.log.name}
                     for s in run.sessions],
        "tests": [{"test_id": t.test_id, "verdict": t.word, "pairs": t.pairs,
                   "metrics": {v.metric: {"verdict": word(v), "change": v.change, "low": v.low, "high": v.high,
                                          "detail": v.detail} for v in t.verdicts}} for t in tests],
    }


def compare(repo: Path, base_ref: str, head_ref: str | None, pytest_args: list[str], plan: Plan, output: Path | None,
            markdown: Path | None, head_env: dict[str, str], progress) -> int:
    """The whole command; returns the exit status."""
    repo = Path(_git(repo, "rev-parse", "--show-toplevel"))
    base_commit = resolve(repo, base_ref)
    head_commit = resolve(repo, head_ref) if head_ref else None
    out = Path(output) if output else Path(tempfile.mkdtemp(prefix="kvbench-compare-"))
    out.mkdir(parents=True, exist_ok=True)
    head_label = head_ref or "working tree"
    run = Run(base_ref, head_label, pytest_args)
    try:
        with ExitStack() as stack:
            base_tree = stack.enter_context(worktree(repo, base_commit, out / "base-tree"))
            head_tree = stack.enter_context(worktree(repo, head_commit, out / "head-tree")) if head_commit else repo
            server = ForkServer()
            stack.push(lambda kind, *_: server.close(interrupted=kind is not None))
            conductor = Conductor(seed=plan.seed)
            stack.callback(conductor.close)
            runner = Runner({"base": base_tree, "head": head_tree}, pytest_args, out, server, conductor,
                            {"head": head_env})
            tests = run_pairs(runner, plan, run, progress)
        _, only_base, only_head = verdicts(run, plan.alpha_per_look, plan.seed)
        (out / "compare.json").write_text(json.dumps(summary_json(run, tests, plan), indent=1) + "\n")
        print(report(run, tests, only_base, only_head, plan, "simple"))
        if markdown:
            with Path(markdown).open("a") as f:
                f.write(report(run, tests, only_base, only_head, plan, "github"))
        return 1 if any(t.word in FAILING for t in tests) else 0
    finally:
        if output is None:
            shutil.rmtree(out, ignore_errors=True)
