"""Under pytest-xdist the workers measure and the controller alone writes results and baselines, once."""

import json

import pytest

from pytest_kvcache.machine import machine_id

SUITE = """
    import math

    import pytest

    @pytest.mark.kv_strategies("full", "streaming:budget=24")
    def test_bench(kv_bench, kv_model, kv_strategy, request_trace):
        trace = request_trace(model=kv_model, rate=math.inf, num_requests=4, prompt_len=32, output_len=8, seed=1)
        kv_bench(trace, kv_model, kv_strategy)
"""


def test_workers_hand_measurements_to_the_controller(pytester, monkeypatch):
    """Two workers, one test each: one results file and one baseline file holding both tests."""
    pytest.importorskip("xdist")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pytester.makepyfile(test_kvsuite=SUITE)
    baselines, results = pytester.path / "baselines", pytester.path / "results"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--benchmark-disable",
                                           "--kv-rounds", "1", "--kv-baselines", str(baselines),
                                           "--kv-results", str(results), "--kv-update-baselines")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*= KV-cache benchmark summary =*",
                                 "test_bench[[]tiny-full[]] * new (baseline updated)",
                                 "baselines updated: * (2 tests)"])
    folder = baselines / machine_id("cpu")
    assert [p.name for p in folder.iterdir()] == ["test_kvsuite.json"]
    entries = json.loads((folder / "test_kvsuite.json").read_text())["entries"]
    assert len(entries) == 2 and "test_bench[tiny-full]" in entries
    assert len(list(results.glob("kvcache-*.json"))) == 1
    latest = json.loads((results / "latest.json").read_text())
    assert sorted(o["test_id"] for o in latest["outcomes"]) == sorted(entries)
    assert latest["machine"]["machine_id"] == machine_id("cpu")
