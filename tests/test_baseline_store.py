"""Baseline files: per-machine JSON, merged per test under a lock, written atomically and 0644, never leaving a
temporary file behind, and refusing entries of another configuration."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pytest_kvcache import results
from pytest_kvcache.baselines import BaselineStore
from pytest_kvcache.results import FormatError, Measurement, remove_stale_temporaries, write_json_atomic

MACHINE = {"machine_id": "cpu-test", "cpu": "test cpu"}


def measurement(test_id, ttft=(1.0, 2.0), evicted=(4, 4), rounds=3):
    return Measurement(test_id, "test_suite", {"strategy": "full", "rounds": rounds},
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
    assert store.problems(["test_suite"]) == []
    assert list(tmp_path.iterdir()) == []


def test_update_writes_entries_keyed_by_test_and_reads_back(tmp_path):
    """Samples, configuration (with its hash), calibration and machine survive the round trip; the file is 0644."""
    store = BaselineStore(tmp_path, "cpu-test")
    report = store.update("test_suite", [measurement("test_a[x]"), measurement("test_b[y]", evicted=(9, 9))], MACHINE)
    data = json.loads(report.path.read_text())
    assert (data["format"], data["kind"]) == (results.FORMAT, "baselines")
    assert sorted(data["entries"]) == ["test_a[x]", "test_b[y]"]
    entry = data["entries"]["test_b[y]"]
    assert entry["metrics"]["kv_tokens_evicted"] == {"samples": [9, 9]}
    assert entry["config_hash"] == results.config_hash({"strategy": "full", "rounds": 3})
    assert entry["machine"] == MACHINE
    again = BaselineStore(tmp_path, "cpu-test").get("test_suite", "test_b[y]")
    assert again.metrics == {"ttft_ms": [1.0, 2.0], "kv_tokens_evicted": [9, 9]}
    assert (again.calibration_s, again.config) == (0.0123, {"strategy": "full", "rounds": 3})
    assert oct(report.path.stat().st_mode & 0o777) == "0o644"
    assert leftovers(report.path.parent) == []


def test_update_merges_and_keeps_other_tests(tmp_path):
    """Updating one test (e.g. under -k) must not drop the other tests' baselines."""
    BaselineStore(tmp_path, "cpu-test").update("test_suite", [measurement("test_a"), measurement("test_b")], MACHINE)
    store = BaselineStore(tmp_path, "cpu-test")
    store.update("test_suite", [measurement("test_b", ttft=(5.0, 6.0))], MACHINE)
    fresh = BaselineStore(tmp_path, "cpu-test")
    assert fresh.get("test_suite", "test_a").metrics["ttft_ms"] == [1.0, 2.0]
    assert fresh.get("test_suite", "test_b").metrics["ttft_ms"] == [5.0, 6.0]


def test_update_rereads_the_file_so_a_stale_store_keeps_newer_entries(tmp_path):
    """Two sessions that read the file before either wrote: the second write keeps the first one's entry."""
    first, second = BaselineStore(tmp_path, "cpu-test"), BaselineStore(tmp_path, "cpu-test")
    assert first.get("test_suite", "x") is None and second.get("test_suite", "x") is None
    first.update("test_suite", [measurement("test_a")], MACHINE)
    second.update("test_suite", [measurement("test_b")], MACHINE)
    assert sorted(json.loads(first.path("test_suite").read_text())["entries"]) == ["test_a", "test_b"]


def _update_one(root, test_id, barrier):
    barrier.wait()
    BaselineStore(root, "cpu-test").update("test_suite", [measurement(test_id)], MACHINE)


def test_concurrent_updates_keep_every_entry(tmp_path):
    """Four processes updating one suite at the same moment: every entry survives (file lock + re-read)."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(4)
    workers = [context.Process(target=_update_one, args=(tmp_path, f"test_{i}", barrier)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    path = BaselineStore(tmp_path, "cpu-test").path("test_suite")
    assert sorted(json.loads(path.read_text())["entries"]) == [f"test_{i}" for i in range(4)]
    assert leftovers(path.parent) == []


def test_entry_of_another_configuration_is_kept_unless_replacing(tmp_path):
    """--kv-rounds 5 must not overwrite the 3-round baseline; --kv-replace-baselines does, on purpose."""
    store = BaselineStore(tmp_path, "cpu-test")
    store.update("test_suite", [measurement("test_a", ttft=(1.0, 1.0))], MACHINE)
    report = store.update("test_suite", [measurement("test_a", ttft=(9.0, 9.0), rounds=5)], MACHINE)
    assert report.written == [] and report.refused == {"test_a": "rounds: 3 -> 5"}
    assert BaselineStore(tmp_path, "cpu-test").get("test_suite", "test_a").metrics["ttft_ms"] == [1.0, 1.0]
    report = store.update("test_suite", [measurement("test_a", ttft=(9.0, 9.0), rounds=5)], MACHINE, replace=True)
    assert report.written == ["test_a"]
    assert BaselineStore(tmp_path, "cpu-test").get("test_suite", "test_a").config["rounds"] == 5


def test_unreadable_entry_is_named_and_replaced_by_an_update(tmp_path):
    """An entry with NaN samples is a one-line error naming file and test; an update replaces it."""
    store = BaselineStore(tmp_path, "cpu-test")
    path = store.update("test_suite", [measurement("test_a"), measurement("test_b")], MACHINE).path
    data = json.loads(path.read_text())
    data["entries"]["test_a"]["metrics"]["ttft_ms"]["samples"] = [1.0, "fast"]
    path.write_text(json.dumps(data))
    store = BaselineStore(tmp_path, "cpu-test")
    problems = store.problems(["test_suite"])
    assert problems == [f"baseline {path} entry 'test_a': metric 'ttft_ms' has samples that are not finite numbers: "
                        "'fast'"]
    with pytest.raises(FormatError, match="not finite numbers"):
        store.get("test_suite", "test_a")
    report = store.update("test_suite", [measurement("test_a", ttft=(3.0, 3.0))], MACHINE)
    assert report.replaced_unreadable == ["test_a"]
    fresh = BaselineStore(tmp_path, "cpu-test")
    assert fresh.problems(["test_suite"]) == []
    assert fresh.get("test_suite", "test_b").metrics["ttft_ms"] == [1.0, 2.0]


def test_corrupt_file_gives_one_line_error_and_is_never_overwritten(tmp_path):
    """A truncated baseline (e.g. an interrupted copy) is refused with the file and how to fix it."""
    store = BaselineStore(tmp_path, "cpu-test")
    path = store.update("test_suite", [measurement("test_a")], MACHINE).path
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    before = path.read_bytes()
    with pytest.raises(FormatError) as info:
        BaselineStore(tmp_path, "cpu-test").get("test_suite", "test_a")
    message = str(info.value)
    assert message.startswith(f"baseline {path} is corrupt") and "\n" not in message
    with pytest.raises(FormatError):
        BaselineStore(tmp_path, "cpu-test").update("test_suite", [measurement("test_a")], MACHINE)
    assert path.read_bytes() == before


def test_write_json_atomic_writes_sorted_json_0644_whatever_the_umask(tmp_path):
    """Stable key order keeps baseline diffs readable; a 077 umask must not make baselines private."""
    path = tmp_path / "deep" / "x.json"
    old = os.umask(0o077)
    try:
        write_json_atomic(path, {"b": 1, "a": [1, 2]})
    finally:
        os.umask(old)
    assert path.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=1, sort_keys=True) + "\n"
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert leftovers(path.parent) == []


def test_write_json_atomic_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "x.json", {"a": float("nan")})
    assert list(tmp_path.iterdir()) == []


KILLED_WRITER = """
    import os, signal, sys
    from pathlib import Path
    from pytest_kvcache import results
    target = sys.argv[1]
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    if target == "fsync":
        os.fsync = die
    else:
        results.os.replace = die
    results.write_json_atomic(Path(sys.argv[2]) / "x.json", {"new": list(range(10000))})
"""


@pytest.mark.parametrize("moment", ["fsync", "replace"], ids=["killed-while-writing", "killed-before-rename"])
def test_no_temporary_file_survives_a_kill(tmp_path, moment):
    """SIGKILL while writing leaves nothing (the file has no name yet); SIGKILL between naming and renaming leaves a
    temporary that the next write in that folder removes. The old file stays intact either way."""
    write_json_atomic(tmp_path / "x.json", {"old": True})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), moment, str(tmp_path)], env=env,
                          check=False)
    assert done.returncode == -signal.SIGKILL
    assert json.loads((tmp_path / "x.json").read_text()) == {"old": True}
    if moment == "fsync":
        assert leftovers(tmp_path) == []
    else:
        assert len(leftovers(tmp_path)) == 1
        write_json_atomic(tmp_path / "y.json", {})
        assert leftovers(tmp_path) == []


def test_stale_temporaries_of_running_writers_are_kept(tmp_path):
    """Only temporaries of processes that are gone are removed: a concurrent writer's file is left alone."""
    mine = tmp_path / f".x.json.{os.getpid()}.abcd1234.tmp"
    mine.write_text("{}")
    assert remove_stale_temporaries(tmp_path) == []
    assert mine.exists()


def test_interrupted_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing must leave the previous file intact and no temp file behind."""
    path = tmp_path / "x.json"
    write_json_atomic(path, {"old": True})

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(results.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(path, {"new": True})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": True}
    assert leftovers(tmp_path) == []


def test_a_file_of_an_older_format_is_replaced_by_an_update(tmp_path):
    """Format-1 baselines cannot be read by this version; recording anew replaces the whole file, and says so."""
    path = tmp_path / "cpu-test" / "test_suite.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"format": 1, "machine": {}, "entries": {"old": {"metrics": {}}}}))
    with pytest.raises(results.OlderFormat):
        BaselineStore(tmp_path, "cpu-test").get("test_suite", "old")
    report = BaselineStore(tmp_path, "cpu-test").update("test_suite", [measurement("test_a")], MACHINE)
    assert report.written == ["test_a"] and "format-1 baselines file" in report.older_format
    assert sorted(json.loads(path.read_text())["entries"]) == ["test_a"]
