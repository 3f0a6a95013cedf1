"""The results and baseline formats (results.py, their one owner): what is refused, in one line, and why."""

import copy
import json

import pytest

from pytest_kvcache.results import (
    FORMAT,
    FormatError,
    Measurement,
    Outcome,
    Results,
    load_results,
    parse_baselines,
    read_baselines,
)

MACHINE = {"machine_id": "cpu-x86_64", "cpu": "test cpu"}
GOOD = Measurement("test_a", "suite", {"rounds": 3}, {"ttft_ms": [1.0, 2.0], "kv_tokens_evicted": [3, 3]}, 0.004,
                   MACHINE)


def baseline_text(edit=None, entry_edit=None):
    data = {"format": FORMAT, "kind": "baselines", "machine": MACHINE, "entries": {"test_a": GOOD.to_entry()}}
    data = copy.deepcopy(data)
    if entry_edit:
        entry_edit(data["entries"]["test_a"])
    if edit:
        edit(data)
    return json.dumps(data)


def entry_error(entry_edit, tmp_path):
    baselines = parse_baselines(baseline_text(entry_edit=entry_edit), tmp_path / "b.json")
    with pytest.raises(FormatError) as info:
        baselines.measurement("test_a", "suite")
    assert "\n" not in str(info.value)
    return str(info.value)


def set_samples(value):
    def edit(entry):
        entry["metrics"]["ttft_ms"]["samples"] = value
    return edit


@pytest.mark.parametrize("edit,message", [
    (set_samples([]), "needs a non-empty 'samples' list"),
    (set_samples(["fast", 2.0]), "not finite numbers: 'fast'"),
    (set_samples([True]), "not finite numbers: True"),
    (lambda e: e.update(calibration_s=0), "calibration_s must be a number > 0 seconds, got 0"),
    (lambda e: e.update(calibration_s=-1e-5), "calibration_s must be a number > 0 seconds, got -1e-05"),
    (lambda e: e["config"].update(rounds=5), "'config_hash' does not match its configuration"),
    (lambda e: e["metrics"].update(ttft_future_ms={"samples": [1]}), "unknown metric 'ttft_future_ms'"),
    (lambda e: e.pop("metrics"), "'metrics' must be an object"),
], ids=["empty", "string", "bool", "calibration-0", "calibration-negative", "hash", "unknown-metric",
        "no-metrics"])
def test_bad_entries_are_one_line_errors_naming_file_and_test(tmp_path, edit, message):
    text = entry_error(edit, tmp_path)
    assert text.startswith(f"baseline {tmp_path / 'b.json'} entry 'test_a': ") and message in text


def test_nan_anywhere_is_refused_with_its_place(tmp_path):
    """NaN turned the old gate off silently; now the file is refused, naming where the NaN is."""
    text = baseline_text(entry_edit=set_samples([1.0, float("nan")]))
    with pytest.raises(FormatError, match=r"holds NaN or infinity at entries\.test_a\.metrics\.ttft_ms\.samples\.1"):
        parse_baselines(text, tmp_path / "b.json")


@pytest.mark.parametrize("text,message", [
    ("", "is empty"),
    ("{\"format\": 2, \"entr", "is corrupt"),
    ("[1, 2]", "is not a pytest-kvcache baselines file"),
    (json.dumps({"format": 1, "entries": {}}), "is a format-1 baselines file; this version reads format 2 baselines "
                                               "files: written by an older pytest-kvcache: re-record it"),
    (json.dumps({"format": 3, "kind": "baselines", "entries": {}}), "is a format-3 baselines file; this version reads"
                                                                    " format 2 baselines files: upgrade"),
    (json.dumps({"format": FORMAT, "kind": "results", "entries": {}}), "is a format-2 results file"),
    (json.dumps({"format": FORMAT, "kind": "baselines", "machine": {}, "entries": {}}), "has no entries"),
], ids=["empty", "truncated", "not-an-object", "format-1", "format-3", "results-not-baselines", "no-entries"])
def test_bad_baseline_files_are_refused(tmp_path, text, message):
    path = tmp_path / "b.json"
    path.write_text(text)
    with pytest.raises(FormatError) as info:
        read_baselines(path)
    assert str(info.value).startswith(f"baseline {path} ") and message in str(info.value)
    assert "\n" not in str(info.value)


def results_file(tmp_path, edit=None):
    data = Results("2026-12-01T00:00:00+00:00", MACHINE, "cpu-x86_64", {"session_sd": 0.15},
                   [Outcome("suite.py::test_a", GOOD, [], {"ttft_ms": 0.5})]).to_json()
    if edit:
        edit(data)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    return path


def test_results_round_trip_keeps_thresholds_and_session(tmp_path):
    loaded = load_results(results_file(tmp_path))
    assert loaded.session == {"session_sd": 0.15}
    (outcome,) = loaded.outcomes
    assert outcome.thresholds == {"ttft_ms": 0.5}
    assert outcome.measurement.metrics == GOOD.metrics and outcome.measurement.config_hash == GOOD.config_hash


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.pop("machine_id"), "has no 'machine_id'"),
    (lambda d: d.update(format=1), "is a format-1 results file"),
    (lambda d: d["outcomes"][0]["thresholds"].update(ttft=0.5), "'thresholds' must map known metrics"),
    (lambda d: d["outcomes"][0]["entry"]["metrics"]["ttft_ms"].update(samples=[]), "non-empty 'samples'"),
], ids=["no-machine-id", "format-1", "unknown-threshold", "empty-samples"])
def test_bad_results_files_are_refused(tmp_path, edit, message):
    path = results_file(tmp_path, edit)
    with pytest.raises(FormatError) as info:
        load_results(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_results_name_the_path(tmp_path):
    with pytest.raises(FormatError, match=f"no results at {tmp_path / 'nothing'}: run `pytest suites/` first"):
        load_results(tmp_path / "nothing")
