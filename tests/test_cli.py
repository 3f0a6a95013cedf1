"""kvbench: diff exits 1 on a regression, 0 otherwise and 2 on bad input (one line, no file changed); report,
trace files and compare's argument checks."""

import json
import subprocess

import pytest

from pytest_kvcache import cli
from pytest_kvcache.baselines import BaselineStore
from pytest_kvcache.results import Measurement, Outcome, Results

MACHINE = {"machine_id": "cpu-x86_64", "cpu": "test cpu"}


def _measurement(ttft: float, strategy: str = "streaming:budget=0.5", suite: str = "test_memory",
                 rounds: int = 3) -> Measurement:
    metrics = {"ttft_ms": [ttft + 0.01 * i for i in range(rounds)], "kv_peak_bytes": [1000.0], "output_tokens": [64]}
    config = {"strategy": strategy, "model": "tiny", "rounds": rounds}
    return Measurement("test_x[tiny]", suite, config, metrics, 0.01, MACHINE)


def _results(tmp_path, measurement: Measurement, thresholds=None):
    results = Results("2026-12-01T00:00:00+00:00", MACHINE, "cpu-x86_64", {"session_sd": 0.15},
                      [Outcome("suites/test_memory.py::test_x[tiny]", measurement, [], thresholds or {})])
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results.to_json()))
    return path


def _baselines(tmp_path, measurement=None):
    folder = tmp_path / "baselines"
    BaselineStore(folder, "cpu-x86_64").update("test_memory", [measurement or _measurement(10.0)], MACHINE)
    return folder


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("current", "code"), [(10.0, 0), (30.0, 1)])
def test_diff_exit_status_tells_regressions_apart(tmp_path, capsys, current, code):
    """CI scripts rely on the exit status: 1 only when something regressed."""
    folder = _baselines(tmp_path)
    results = _results(tmp_path, _measurement(current))
    assert cli.main(["diff", str(folder), "--results", str(results)]) == code
    out = capsys.readouterr().out
    assert "test_x[tiny]" in out and ("1 regressed" if code else "0 regressed") in out


def test_diff_uses_the_thresholds_stored_in_the_results(tmp_path, capsys):
    """kv_thresholds travel in the results file: a +35% TTFT under ttft_ms=0.5 is unchanged for diff as for pytest."""
    folder = _baselines(tmp_path, Measurement("test_x[tiny]", "test_memory", {"rounds": 3},
                                              {"ttft_ms": [10.0, 10.0, 10.0]}, 0.01, MACHINE))
    current = Measurement("test_x[tiny]", "test_memory", {"rounds": 3}, {"ttft_ms": [13.5, 13.5, 13.5]}, 0.01, MACHINE)
    loose = _results(tmp_path, current, {"ttft_ms": 0.5})
    assert cli.main(["diff", str(folder), "--results", str(loose)]) == 0


def test_diff_on_missing_results_is_exit_2_with_advice(tmp_path, capsys):
    assert cli.main(["diff", str(tmp_path), "--results", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "run `pytest suites/` first" in err and len(err.strip().splitlines()) == 1


def edit_baseline(folder, change):
    path = folder / "cpu-x86_64" / "test_memory.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def samples(value):
    def change(data):
        data["entries"]["test_x[tiny]"]["metrics"]["ttft_ms"]["samples"] = value
    return change


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(format=1), "is a format-1 baselines file; this version reads format 2 baselines files"),
    (lambda d: d.update(format=3), "is a format-3 baselines file; this version reads format 2 baselines files: upgrade"),
    (samples([10.0, float("nan")]), "holds NaN or infinity at entries.test_x[tiny].metrics.ttft_ms.samples.1"),
    (samples([]), "metric 'ttft_ms' needs a non-empty 'samples' list"),
    (samples(["10", 11.0]), "metric 'ttft_ms' has samples that are not finite numbers: '10'"),
    (lambda d: d["entries"]["test_x[tiny]"].update(calibration_s=0), "calibration_s must be a number > 0 seconds"),
], ids=["format-1", "format-3", "nan", "empty-samples", "string-samples", "calibration-0"])
def test_diff_refuses_bad_baselines_in_one_line_and_changes_nothing(tmp_path, capsys, change, message):
    folder = _baselines(tmp_path)
    edit_baseline(folder, change)
    results = _results(tmp_path, _measurement(30.0))
    before = snapshot(tmp_path)
    assert cli.main(["diff", str(folder), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvbench: error: baseline ") and message in err and "\n" not in err
    assert snapshot(tmp_path) == before


def test_diff_refuses_results_without_machine_id(tmp_path, capsys):
    results = _results(tmp_path, _measurement(10.0))
    data = json.loads(results.read_text())
    del data["machine_id"]
    results.write_text(json.dumps(data))
    assert cli.main(["diff", str(_baselines(tmp_path)), "--results", str(results)]) == 2
    assert "has no 'machine_id'" in capsys.readouterr().err


@pytest.mark.parametrize("change,status", [
    (lambda d: d["entries"]["test_x[tiny]"].update(calibration_s=1e-5), "calibration ratio x0.001"),
    (lambda d: d["entries"]["test_x[tiny]"]["config"].update(rounds=5), "configuration differs (rounds: 5 -> 3)"),
], ids=["calibration-1e-5", "another-configuration"])
def test_diff_says_not_comparable_instead_of_judging(tmp_path, capsys, change, status):
    folder = _baselines(tmp_path)

    def edited(data):
        change(data)
        entry = data["entries"]["test_x[tiny]"]
        from pytest_kvcache.results import config_hash

        entry["config_hash"] = config_hash(entry["config"])

    edit_baseline(folder, edited)
    results = _results(tmp_path, _measurement(30.0))
    before = snapshot(tmp_path)
    assert cli.main(["diff", str(folder), "--results", str(results), "--format", "plain"]) == 0
    out = capsys.readouterr().out
    assert "not comparable" in out and status in out
    assert snapshot(tmp_path) == before


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "config", "user.email", "t@example.com")
    git(tmp_path, "config", "user.name", "t")
    return tmp_path


def test_diff_against_a_git_ref(repo, capsys, monkeypatch):
    """Baselines are read from the ref; an empty file or no file at the ref is bad input, not a pass."""
    _baselines(repo)
    git(repo, "add", "baselines")
    git(repo, "commit", "-q", "-m", "baselines")
    monkeypatch.chdir(repo)
    results = _results(repo, _measurement(30.0))
    assert cli.main(["diff", "main", "--results", str(results)]) == 1
    capsys.readouterr()
    (repo / "baselines" / "cpu-x86_64" / "test_memory.json").write_text("")
    git(repo, "commit", "-q", "-am", "empty")
    assert cli.main(["diff", "main", "--results", str(results)]) == 2
    assert "main:baselines/cpu-x86_64/test_memory.json is empty" in capsys.readouterr().err
    git(repo, "rm", "-q", "baselines/cpu-x86_64/test_memory.json")
    git(repo, "commit", "-q", "-m", "none")
    assert cli.main(["diff", "main", "--results", str(results)]) == 2
    assert "no baselines for machine cpu-x86_64 at main" in capsys.readouterr().err
    assert cli.main(["diff", "nosuchref", "--results", str(results)]) == 2
    assert "'nosuchref' is neither a folder nor a git ref" in capsys.readouterr().err


def test_report_writes_tables_and_budget_plots(tmp_path):
    """The characterization report plots each strategy against its budget."""
    results = _results(tmp_path, _measurement(10.0))
    assert cli.main(["report", str(results), "-o", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "README.md").read_text()
    assert "## test_memory" in text and "test_x[tiny]" in text
    assert (tmp_path / "report" / "test_memory-kv_peak_bytes.png").stat().st_size > 1000


def test_trace_then_check_trace_round_trip(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    assert cli.main(["trace", "-o", str(path), "--rate", "inf", "--num-requests", "3", "--prompt-len", "8"]) == 0
    assert cli.main(["check-trace", str(path), "--vocab-size", "1024"]) == 0
    assert "3 requests" in capsys.readouterr().out
    path.write_text('{"id": "a", "arrival_s": 0, "prompt_ids": [1], "max_new_tokens": 0}\n')
    assert cli.main(["check-trace", str(path)]) == 2
    assert f"{path}:1: 'max_new_tokens' must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["compare", "nosuchref"], "'nosuchref' is not a commit of the repository"),
    (["compare", "main", "--pairs", "12", "--max-pairs", "4"], "--max-pairs 4 is below --pairs 12"),
    (["compare", "main", "--head-env", "oops"], "--head-env expects NAME=VALUE, got 'oops'"),
], ids=["bad-ref", "max-below-pairs", "bad-env"])
def test_compare_bad_arguments_are_exit_2(repo, capsys, monkeypatch, args, message):
    (repo / "f").write_text("x")
    git(repo, "add", "f")
    git(repo, "commit", "-q", "-m", "f")
    monkeypatch.chdir(repo)
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
