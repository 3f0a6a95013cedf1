"""The real vLLM engine: same token counts as hf, preemption reaching the summary, failures contained, no strays."""

import math
import os
import uuid

import psutil
import pytest

from pytest_kvcache.engines import vllm
from pytest_kvcache.engines.hf import HFEngine
from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.models import load_model
from pytest_kvcache.report import SUMMARY_HEADERS
from pytest_kvcache.strategies import parse_strategy
from pytest_kvcache.traces import TraceSpec, synthetic

pytestmark = pytest.mark.skipif(not vllm.available(), reason=vllm.INSTALL_HINT)
TAG = "KVCACHE_STRAY_CHECK"


def _processes_tagged(tag: str) -> list[psutil.Process]:
    """Processes whose environment carries this tag: a session's workers and their EngineCores inherit it, while
    engines of other sessions on the machine do not."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(TAG) == tag:
                found.append(process)
        except psutil.Error:
            continue
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
    assert all(len(r.token_times_s) == len(r.output_ids) and r.success for r in got.records)
    assert got.extra["harness_overhead"] < 0.05


def test_pool_without_a_usable_block_is_refused_before_start():
    with pytest.raises(KVConfigError, match=r"holds no usable block .* kv_cache_memory_bytes >= 524288"):
        vllm.VLLMEngine(load_model("tiny"), parse_strategy("vllm:kv_cache_memory_bytes=300000")).engine_args()


SUITE = """
    import math
    import pytest
    from pytest_kvcache.engines.vllm import VLLMEngine
    from pytest_kvcache.strategies import parse_strategy

    def trace(request_trace, kv_model):
        return request_trace(model=kv_model, rate=math.inf, num_requests=16, prompt_len=128, output_len=256, seed=4)

    def test_bad_model_path(kv_bench, kv_model, request_trace, tmp_path):
        strategy = parse_strategy("vllm:kv_cache_memory_bytes=3145728")
        engine = VLLMEngine(kv_model, strategy, model_path=tmp_path / "no-such-model")
        kv_bench(trace(request_trace, kv_model), kv_model, strategy, engine=engine)

    @pytest.mark.kv_strategies("vllm:kv_cache_memory_bytes=100000", "vllm:kv_cache_memory_bytes=3145728")
    def test_engine(kv_bench, kv_model, kv_strategy, request_trace):
        measurement = kv_bench(trace(request_trace, kv_model), kv_model, kv_strategy)
        assert measurement.summary("preemptions") > 0
"""


def _cell(lines: list[str], test_id: str, header: str) -> str:
    """The summary table's cell under `header` in the row of test_id (no cell before the verdict has spaces)."""
    row = next(line for line in lines if line.startswith(test_id + " "))
    return row.split()[SUMMARY_HEADERS.index(header)]


def test_failures_are_contained_pressure_preempts_and_nothing_is_left_running(pytester, monkeypatch):
    """A bad model path and an impossible memory setting each fail their own test in one line; the next test
    starts an engine and preempts, and the preemptions reach the summary table; no engine process remains."""
    tag = uuid.uuid4().hex
    monkeypatch.setenv(TAG, tag)
    pytester.makepyfile(test_vllm_suite=SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--benchmark-disable", "--kv-rounds", "1",
                                           "--kv-baselines", str(pytester.path / "b"),
                                           "--kv-results", str(pytester.path / "r"), timeout=900)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines([
        "*_ test_bad_model_path[[]tiny[]] _*",
        "KVConfigError: vLLM engine failed to start (*Error: *no-such-model*); full log: *",
        "*_ test_engine[[]tiny-vllm-kv_cache_memory_bytes100000[]] _*",
        "KVConfigError: *holds no usable block*",
    ])
    assert int(_cell(result.stdout.lines, "test_engine[tiny-vllm-kv_cache_memory_bytes3145728]", "preempt")) > 0
    assert not _processes_tagged(tag)
