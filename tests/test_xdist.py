"""Under pytest-xdist the workers measure and the controller alone writes results and baselines, once; workers
that share the CPUs say so and do not record time baselines."""

import json
import os

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


@pytest.fixture
def two_cpus():
    """Run the subprocess on exactly two CPUs, so two workers share them whatever the machine."""
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs and CPU affinity")
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(before)[:2])
    yield
    os.sched_setaffinity(0, before)


def test_workers_hand_measurements_to_the_controller(pytester, monkeypatch, two_cpus):
    """Two workers on two CPUs, one test each: one results file and one baseline file holding both tests, without
    their time metrics, and a warning that says why."""
    pytest.importorskip("xdist")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pytester.makepyfile(test_kvsuite=SUITE)
    baselines, results = pytester.path / "baselines", pytester.path / "results"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--benchmark-disable",
                                           "--kv-rounds", "1", "--kv-baselines", str(baselines),
                                           "--kv-results", str(results), "--kv-update-baselines")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*= KV-cache benchmark summary =*",
                                 "machine cpu-* xdist workers share the CPUs: timings contend",
                                 "test_bench[[]tiny-full[]] * new (baseline updated)",
                                 "2 xdist workers share 2 CPUs: their timings contend, so time and rate metrics were "
                                 "NOT recorded as baselines; record those without -n",
                                 "baselines updated: * (2 tests)"])
    folder = baselines / machine_id("cpu")
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".lock")] == ["test_kvsuite.json"]
    entries = json.loads((folder / "test_kvsuite.json").read_text())["entries"]
    assert len(entries) == 2 and "test_bench[tiny-full]" in entries
    metrics = entries["test_bench[tiny-full]"]["metrics"]
    assert "kv_tokens_evicted" in metrics and "ttft_ms" not in metrics and "output_throughput" not in metrics
    assert entries["test_bench[tiny-full]"]["config"]["workers"] == 2
    assert len(list(results.glob("kvcache-*.json"))) == 1
    latest = json.loads((results / "latest.json").read_text())
    assert sorted(o["test_id"] for o in latest["outcomes"]) == sorted(entries)
    assert latest["session"]["workers"] == 2 and latest["session"]["shared_cores"] is True
    assert "ttft_ms" in latest["outcomes"][0]["entry"]["metrics"]
