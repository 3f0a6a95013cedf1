"""Baseline files: per-machine JSON, merged per test, written atomically, corrupt files refused by name."""

import json
import os

import pytest

from pytest_kvcache import baselines
from pytest_kvcache.baselines import BaselineError, BaselineStore, Measurement, write_json_atomic

MACHINE = {"machine_id": "cpu-test", "cpu": "test cpu"}


def measurement(test_id, ttft=(1.0, 2.0), evicted=(4, 4)):
    return Measurement(test_id, "test_suite", {"strategy": "full"},
                       {"ttft_ms": list(ttft), "kv_tokens_evicted": list(evicted)}, 0.0123, MACHINE)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_path_is_machine_then_suite(tmp_path):
    """Baselines of different machines never overwrite each other."""
    store = BaselineStore(tmp_path, "cpu-test")
    assert store.path("test_latency") == tmp_path / "cpu-test" / "test_latency.json"


def test_missing_file_means_no_baseline(tmp_path):
    """A suite never recorded has no baseline (verdict new), and reading creates nothing."""
    store = BaselineStore(tmp_path, "cpu-test")
    assert store.get("test_suite", "test_a[x]") is None
    assert list(tmp_path.iterdir()) == []


def test_update_writes_entries_keyed_by_test_and_reads_back(tmp_path):
    """Samples survive the round trip so later runs compare distributions, not single numbers."""
    store = BaselineStore(tmp_path, "cpu-test")
    path = store.update("test_suite", [measurement("test_a[x]"), measurement("test_b[y]", evicted=(9, 9))], MACHINE)
    data = json.loads(path.read_text())
    assert data["format"] == baselines.BASELINE_FORMAT
    assert data["machine"] == MACHINE
    assert sorted(data["entries"]) == ["test_a[x]", "test_b[y]"]
    assert data["entries"]["test_b[y]"]["metrics"]["kv_tokens_evicted"] == {"samples": [9, 9]}
    again = BaselineStore(tmp_path, "cpu-test").get("test_suite", "test_b[y]")
    assert again.metrics == {"ttft_ms": [1.0, 2.0], "kv_tokens_evicted": [9, 9]}
    assert again.calibration_s == 0.0123
    assert again.config == {"strategy": "full"}
    assert leftovers(path.parent) == []


def test_update_merges_and_keeps_other_tests(tmp_path):
    """Updating one test (e.g. under -k) must not drop the other tests' baselines."""
    BaselineStore(tmp_path, "cpu-test").update("test_suite", [measurement("test_a"), measurement("test_b")], MACHINE)
    store = BaselineStore(tmp_path, "cpu-test")
    store.update("test_suite", [measurement("test_b", ttft=(5.0, 6.0))], MACHINE)
    fresh = BaselineStore(tmp_path, "cpu-test")
    assert fresh.get("test_suite", "test_a").metrics["ttft_ms"] == [1.0, 2.0]
    assert fresh.get("test_suite", "test_b").metrics["ttft_ms"] == [5.0, 6.0]


def test_corrupt_file_gives_one_line_error_naming_it(tmp_path):
    """A truncated baseline (e.g. an interrupted copy) is refused with the file and how to fix it."""
    store = BaselineStore(tmp_path, "cpu-test")
    path = store.update("test_suite", [measurement("test_a")], MACHINE)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    before = path.read_bytes()
    with pytest.raises(BaselineError) as info:
        BaselineStore(tmp_path, "cpu-test").get("test_suite", "test_a")
    message = str(info.value)
    assert f"baseline {path} is corrupt" in message
    assert "--kv-update-baselines" in message
    assert "\n" not in message
    with pytest.raises(BaselineError):
        BaselineStore(tmp_path, "cpu-test").update("test_suite", [measurement("test_a")], MACHINE)
    assert path.read_bytes() == before


@pytest.mark.parametrize("content", ['[1, 2]', '{"format": 99, "entries": {}}', '{"format": 1, "entries": []}'],
                         ids=["not-an-object", "future-format", "entries-not-a-dict"])
def test_wrong_format_is_refused(tmp_path, content):
    """Files of another format version are refused, not misread (asv refuses newer result files too)."""
    path = tmp_path / "cpu-test" / "test_suite.json"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(BaselineError, match=f"baseline {path} is not a format-1 baseline file"):
        BaselineStore(tmp_path, "cpu-test").get("test_suite", "test_a")


def test_malformed_entry_names_file_and_test(tmp_path):
    """A hand-edited entry without samples points at the entry, not at a KeyError deep inside."""
    path = tmp_path / "cpu-test" / "test_suite.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"format": 1, "machine": {}, "entries": {"test_a": {"metrics": {"ttft_ms": {}}}}}))
    with pytest.raises(BaselineError, match=r"entry 'test_a' is malformed"):
        BaselineStore(tmp_path, "cpu-test").get("test_suite", "test_a")


def test_write_json_atomic_writes_sorted_json(tmp_path):
    """Stable key order keeps baseline diffs in git readable."""
    path = tmp_path / "deep" / "x.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=1, sort_keys=True) + "\n"
    assert leftovers(path.parent) == []


def _interrupting_dump(obj, f, **kwargs):
    f.write('{"entries": {"half')
    raise KeyboardInterrupt


def _interrupting_replace(src, dst):
    raise KeyboardInterrupt


@pytest.mark.parametrize("target,patch", [("dump", _interrupting_dump), ("replace", _interrupting_replace)])
def test_interrupted_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch, target, patch):
    """Ctrl-C in the middle of writing must leave the previous file intact and no temp file behind."""
    path = tmp_path / "x.json"
    write_json_atomic(path, {"old": True})
    before = path.read_bytes()
    monkeypatch.setattr(baselines.json if target == "dump" else baselines.os, target, patch)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(path, {"new": True, "big": list(range(1000))})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_interrupted_store_update_keeps_old_baseline(tmp_path, monkeypatch):
    """An update killed midway keeps the old baselines readable and unchanged, in the file and in the store."""
    store = BaselineStore(tmp_path, "cpu-test")
    path = store.update("test_suite", [measurement("test_a")], MACHINE)
    before = path.read_bytes()
    monkeypatch.setattr(baselines.json, "dump", _interrupting_dump)
    with pytest.raises(KeyboardInterrupt):
        store.update("test_suite", [measurement("test_a", ttft=(9.0, 9.0)), measurement("test_new")], MACHINE)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert leftovers(path.parent) == []
    assert store.get("test_suite", "test_new") is None
    assert store.get("test_suite", "test_a").metrics["ttft_ms"] == [1.0, 2.0]


def test_failed_replace_removes_temp_file(tmp_path, monkeypatch):
    """An OSError from the rename (e.g. read-only target) propagates and still cleans up the temp file."""
    path = tmp_path / "x.json"
    write_json_atomic(path, {"old": True})

    def fail(src, dst):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_json_atomic(path, {"new": True})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": True}
    assert leftovers(tmp_path) == []
