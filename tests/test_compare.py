"""kvbench compare: the pair-by-pair verdicts, the adaptive rule, the report, and one real run on a small repo."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_kvcache import cli
from pytest_kvcache.compare import Judgement, Plan, Run, Session, report, sequential, verdicts
from pytest_kvcache.results import UNKNOWN, Measurement, Outcome, Results

ROOT = Path(__file__).resolve().parent.parent
MACHINE = {"cpu": "test cpu"}
SPREAD = [1.0, 1.02, 0.99, 1.01, 1.0, 1.03, 0.98, 1.01, 1.0, 1.02]


def session(side, pair, tests, disturbed=False):
    """A session whose results hold `tests`: test id -> metrics."""
    info = {"cpus": [1], "still_disturbed": int(disturbed)}
    outcomes = [Outcome(f"suite.py::{t}", Measurement(t, "suite", {"rounds": 1}, metrics, 0.01, MACHINE, info), [])
                for t, metrics in tests.items()]
    return Session(side, pair, Results("", MACHINE, "cpu-x86_64", {}, outcomes), 0, 1.0, Path(f"pair{pair}-{side}.log"))


def run_of(base_tests, head_tests, pairs=10):
    run = Run("main", "working tree", ["suites/", "-m", "smoke"])
    for i in range(pairs):
        run.orders.append(["base", "head"] if i % 2 else ["head", "base"])
        run.sessions += [session("base", i, base_tests(i)), session("head", i, head_tests(i))]
    return run


def test_pairs_give_same_slower_changed_added_and_removed():
    """Per test: +25% TPOT is slower, a moved counter is changed, tests on one side are added/removed."""
    def base(i):
        return {"test_same": {"tpot_ms": [10 * SPREAD[i]]}, "test_slow": {"tpot_ms": [10 * SPREAD[i]]},
                "test_counter": {"tpot_ms": [10 * SPREAD[i]], "kv_tokens_evicted": [7]}, "test_gone": {"tpot_ms": [1.0]}}

    def head(i):
        return {"test_same": {"tpot_ms": [10 * SPREAD[i] * 1.001]}, "test_slow": {"tpot_ms": [12.5 * SPREAD[i]]},
                "test_counter": {"tpot_ms": [10 * SPREAD[i]], "kv_tokens_evicted": [8]}, "test_new": {"tpot_ms": [1.0]}}

    tests, only_base, only_head = verdicts(run_of(base, head), alpha=0.01)
    words = {t.test_id: t.word for t in tests}
    assert words == {"test_same": "same", "test_slow": "slower", "test_counter": "changed"}
    assert (only_base, only_head) == (["test_gone"], ["test_new"])
    slow = next(t for t in tests if t.test_id == "test_slow")
    assert slow.deciding.metric == "tpot_ms" and slow.deciding.change == pytest.approx(0.25)
    assert slow.deciding.low > 1.0 and slow.pairs == 10


def test_disturbed_pairs_are_left_out():
    """A pair in which a session kept waiting for its CPU is no sample: a 3x outlier there changes nothing."""
    run = run_of(lambda i: {"test_a": {"tpot_ms": [10 * SPREAD[i]]}}, lambda i: {"test_a": {"tpot_ms": [10 * SPREAD[i]]}})
    run.orders.append(["base", "head"])
    run.sessions += [session("base", 10, {"test_a": {"tpot_ms": [10.0]}}),
                     session("head", 10, {"test_a": {"tpot_ms": [30.0]}}, disturbed=True)]
    assert len(run.pairs()) == 11 and len(run.usable()) == 10
    tests, _, _ = verdicts(run, 0.01)
    assert tests[0].word == "same" and tests[0].pairs == 10
    text = report(run, tests, [], [], Plan(10, 10, 4, "random", 0), "simple")
    assert "10 pairs of sessions (1 more were disturbed by other processes and left out)" in text


def test_report_names_order_cpus_verdicts_and_notes():
    def base(i):
        return {"test_a": {"tpot_ms": [10 * SPREAD[i]], "kv_tokens_evicted": [7]}}

    def head(i):
        return {"test_a": {"tpot_ms": [10 * SPREAD[i]], "kv_tokens_evicted": [8]}, "test_b": {"tpot_ms": [1.0]}}

    run = run_of(base, head)
    tests, only_base, only_head = verdicts(run, 0.01)
    plan = Plan(10, 10, 4, "abba", 0)
    text = report(run, tests, only_base, only_head, plan, "github")
    assert text.startswith("### kvbench compare: working tree vs main\n")
    assert "1 tests: 1 changed. 10 pairs of sessions (`pytest suites/ -m smoke`), each pair interleaved round by round, leading side abba (seed 0): HB BH HB" in text
    assert "CPUs [1]" in text
    assert "| test_a | changed | kv_tokens_evicted |" in " ".join(text.split())
    assert "- test_a: kv_tokens_evicted changed: exact counter changed: 7 -> 8" in text
    assert "- added (only on working tree): test_b" in text


def test_too_few_pairs_are_unknown_and_the_adaptive_rule_adds_pairs():
    """Under 8 pairs nothing is claimed; unknown tests make the compare measure more pairs, up to the maximum."""
    def base(i):
        return {"test_a": {"tpot_ms": [10 * SPREAD[i]]}}

    def head(i):
        return {"test_a": {"tpot_ms": [13 * SPREAD[i]]}}

    tests, _, _ = verdicts(run_of(base, head, pairs=7), 0.01)
    assert tests[0].word == UNKNOWN
    asked = []

    def judge(n):
        asked.append(n)
        return [Judgement("t", UNKNOWN, [], n)]

    sequential(Plan(12, 20, 4, "random", 0), judge)
    assert asked == [12, 16, 20]
    asked.clear()
    sequential(Plan(12, 20, 4, "random", 0), lambda n: asked.append(n) or [Judgement("t", "same", [], n)])
    assert asked == [12]
    assert Plan(12, 20, 4, "random", 0).looks == 3


SUITE = '''
import math
import pytest


@pytest.mark.smoke
def test_tiny(kv_bench, kv_model, request_trace):
    trace = request_trace(model=kv_model, rate=math.inf, num_requests=2, prompt_len=16, output_len=6)
    kv_bench(trace, kv_model)
'''


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path):
    """A small repository: this package, the slowdown plugin and a one-test suite, committed as `main`."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "pytest_kvcache", repo / "pytest_kvcache",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "plant_slowdown.py", repo / "benchmarks" / "plant_slowdown.py")
    (repo / "suites").mkdir()
    (repo / "suites" / "test_tiny.py").write_text(SUITE)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "base")
    return repo


def test_compare_finds_a_planted_slowdown_in_the_working_tree(repo, tmp_path, monkeypatch, capsys):
    """A real compare: base worktree against the working tree (with an added test), the head's decode step made 4x
    slower through --head-env (far beyond the noise, so the verdict is certain; the power at 5-20% is measured by
    benchmarks/gate_experiments.py); exit 1, markdown appended, the order and CPUs recorded, no worktree left."""
    (repo / "suites" / "test_tiny.py").write_text(SUITE + SUITE.replace("test_tiny", "test_added"))
    monkeypatch.chdir(repo)
    summary, out = tmp_path / "summary.md", tmp_path / "out"
    summary.write_text("# CI\n")
    code = cli.main(["compare", "main", "--pairs", "8", "--max-pairs", "8", "--output", str(out), "--markdown",
                     str(summary), "--head-env", "KVBENCH_PLANT_SLOWDOWN=3", "--",
                     "suites/", "-p", "benchmarks.plant_slowdown", "--kv-rounds", "1"])
    assert code == 1, capsys.readouterr()
    printed = capsys.readouterr()
    assert "test_tiny[tiny] slower" in " ".join(printed.out.split())
    text = summary.read_text()
    assert text.startswith("# CI\n### kvbench compare: working tree vs main")
    assert "| test_tiny[tiny] | slower |" in " ".join(text.split()) and "- added (only on working tree): test_added[tiny]" in text
    data = json.loads((out / "compare.json").read_text())
    replaced = len({s["pair"] for s in data["sessions"] if s["disturbed"]})  # a busy machine may disturb some
    assert len(data["orders"]) == 8 + replaced and all(sorted(o) == ["base", "head"] for o in data["orders"])
    left = f"; {replaced} disturbed by other processes, replaced" if replaced else ""
    assert f"pair {8 + replaced} done (8/8 usable, max 8{left})" in printed.err
    assert [(t["verdict"], t["pairs"]) for t in data["tests"]] == [("slower", 8)]
    assert git(repo, "worktree", "list").count("\n") == 1


def test_compare_refuses_a_base_whose_results_it_cannot_read(repo, monkeypatch, capsys):
    """A BASE that writes another results format is refused in one line, exit 2."""
    results = repo / "pytest_kvcache" / "results.py"
    results.write_text(results.read_text().replace("FORMAT = 2", "FORMAT = 1"))
    git(repo, "commit", "-q", "-am", "old format")
    git(repo, "checkout", "-q", "HEAD~1", "--", "pytest_kvcache/results.py")
    monkeypatch.chdir(repo)
    assert cli.main(["compare", "main", "--pairs", "8", "--max-pairs", "8", "--", "suites/", "--kv-rounds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "base (" in err and "writes results this version cannot read" in err and "format-1 results file" in err
    assert "\n" not in err
