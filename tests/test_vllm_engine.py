"""The real vLLM engine: same token counts as hf, preemption reaching the summary, failures contained, no strays."""

import math

import psutil
import pytest

from pytest_kvcache.engines import vllm
from pytest_kvcache.engines.hf import HFEngine
from pytest_kvcache.models import load_model
from pytest_kvcache.strategies import parse_strategy
from pytest_kvcache.traces import TraceSpec, synthetic

pytestmark = pytest.mark.skipif(not vllm.available(), reason=vllm.INSTALL_HINT)


def _workers() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "name"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "pytest_kvcache.engines.vllm_worker" in cmdline or (process.info["name"] or "").startswith("VLLM::"):
            found.append(process)
    return found


def test_same_trace_same_token_counts_as_hf_full():
    """Both engines generate exactly max_new_tokens per request (EOS ignored), so their metrics compare."""
    model = load_model("tiny")
    trace = synthetic(TraceSpec(num_requests=5, rate=math.inf, prompt_len=48, output_len=12, range_ratio=0.5,
                                vocab_size=model.vocab_size, seed=11))
    try:
        got = vllm.VLLMEngine(model, parse_strategy("vllm")).run(trace)
    finally:
        vllm.shutdown_all()
    want = HFEngine(model, parse_strategy("full")).run(trace)
    assert [len(r.output_ids) for r in got.records] == [len(r.output_ids) for r in want.records]
    assert [len(r.output_ids) for r in got.records] == [r.max_new_tokens for r in trace.requests]
    assert all(len(r.token_times_s) == len(r.output_ids) for r in got.records)
    assert got.extra["harness_overhead"] < 0.05


SUITE = """
    import math
    import pytest

    @pytest.mark.kv_strategies("vllm:kv_cache_memory_bytes=100000", "vllm:kv_cache_memory_bytes=3145728")
    def test_engine(kv_bench, kv_model, kv_strategy, request_trace):
        trace = request_trace(model=kv_model, rate=math.inf, num_requests=16, prompt_len=128, output_len=256, seed=4)
        measurement = kv_bench(trace, kv_model, kv_strategy)
        assert measurement.summary("preemptions") > 0
"""


def test_pressure_preempts_failures_are_contained_and_nothing_is_left_running(pytester):
    """An impossible memory setting fails its own test in one line; the next test starts an engine, preempts,
    and the preemptions reach the summary table; after the session no engine process remains."""
    pytester.makepyfile(test_vllm_suite=SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--benchmark-disable", "--kv-rounds", "1",
                                           "--kv-baselines", str(pytester.path / "b"),
                                           "--kv-results", str(pytester.path / "r"), timeout=900)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*KVConfigError: vLLM engine failed to start (*Error: *",
        "*test_engine[[]tiny-vllm-kv_cache_memory_bytes3145728[]]*",
    ])
    row = [line for line in result.stdout.lines if line.startswith("test_engine[tiny-vllm-kv_cache_memory_bytes3145728]")]
    assert row and int(row[0].split()[-2]) > 0, row
    assert not _workers()
