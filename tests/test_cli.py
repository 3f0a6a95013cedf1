"""kvbench: diff exits 1 on a regression and 0 otherwise, usable outside pytest; report and trace files."""

import json

import pytest

from pytest_kvcache import cli
from pytest_kvcache.baselines import BaselineStore, Measurement

MACHINE = {"machine_id": "cpu-x86_64", "cpu": "test cpu"}


def _measurement(ttft: float, strategy: str = "streaming:budget=0.5", suite: str = "test_memory") -> Measurement:
    metrics = {"ttft_ms": [ttft + 0.01 * i for i in range(12)], "kv_peak_bytes": [1000.0], "output_tokens": [64]}
    return Measurement("test_x[tiny]", suite, {"strategy": strategy, "model": "tiny"}, metrics, 0.01, MACHINE)


def _results(tmp_path, measurement: Measurement):
    outcome = {"nodeid": "suites/test_memory.py::test_x[tiny]", "test_id": measurement.test_id,
               "suite": measurement.suite, "status": "new", "updated": False, "entry": measurement.to_entry(),
               "summary": {}, "verdicts": []}
    data = {"format": 1, "created": "2026-11-25T00:00:00+00:00", "machine": MACHINE, "machine_id": "cpu-x86_64",
            "calibration_s": 0.01, "outcomes": [outcome]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(("current", "code"), [(10.0, 0), (30.0, 1)])
def test_diff_exit_status_tells_regressions_apart(tmp_path, capsys, current, code):
    """CI scripts rely on the exit status: 1 only when something regressed."""
    BaselineStore(tmp_path / "baselines", "cpu-x86_64").update("test_memory", [_measurement(10.0)], MACHINE)
    results = _results(tmp_path, _measurement(current))
    assert cli.main(["diff", str(tmp_path / "baselines"), "--results", str(results)]) == code
    out = capsys.readouterr().out
    assert "test_x[tiny]" in out and ("1 regressed" if code else "0 regressed") in out


def test_diff_on_missing_results_is_exit_2_with_advice(tmp_path, capsys):
    assert cli.main(["diff", str(tmp_path), "--results", str(tmp_path / "nothing")]) == 2
    assert "run `pytest suites/` first" in capsys.readouterr().err


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
