"""The engine on a CUDA device: captured steps equal eager ones, the kernel path equals the module path in fp32,
every strategy reproduces the full cache at a whole-context budget, and out of memory leaves the device clean.
Skipped without CUDA (they run on the GPU machine: `python -m pytest tests/test_cuda.py`)."""

import math

import pytest
import torch

from pytest_kvcache.engines.decoder import Decoder, greedy
from pytest_kvcache.engines.hf import HFEngine
from pytest_kvcache.errors import KVOutOfMemory
from pytest_kvcache.memory import MemoryWatcher
from pytest_kvcache.models import load_model
from pytest_kvcache.strategies import parse_strategy
from pytest_kvcache.traces import TraceSpec, synthetic

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

WHOLE_BUDGET = ["streaming:budget=1.0", "h2o:budget=1.0", "paged", "paged:block_size=7", "quantized:residual=128",
                "infinigen:fetch_all=1"]


def trace_for(model, **kwargs):
    spec = dict(num_requests=5, rate=math.inf, prompt_len=60, output_len=12, range_ratio=0.3,
                vocab_size=model.vocab_size, seed=4)
    return synthetic(TraceSpec(**{**spec, **kwargs}))


def tokens(result):
    return [r.output_ids for r in result.records]


@pytest.fixture(scope="module")
def tiny_fp32():
    return load_model("tiny", "cuda", dtype=torch.float32)


@pytest.mark.parametrize("spec", ["full", "streaming:budget=0.3", "h2o:budget=0.3", "paged:block_size=16"])
def test_captured_steps_equal_eager_steps(spec, monkeypatch):
    """Graph replay runs the same kernels as the eager step: same tokens and counters, bf16 included."""
    model = load_model("tiny", "cuda")
    trace = trace_for(model)
    captured = HFEngine(model, parse_strategy(spec))
    with_graphs = captured.run(trace)
    assert captured.decoder.graphs, "a capturable policy on CUDA runs from graphs"
    monkeypatch.setattr(Decoder, "capture", lambda self, max_batch: None)
    eager = HFEngine(model, parse_strategy(spec)).run(trace)
    assert tokens(with_graphs) == tokens(eager)
    assert with_graphs.counters == eager.counters


@pytest.mark.parametrize("vocab", [128256, 49152, 1024])
def test_greedy_is_argmax_ties_included(vocab):
    """The two-level argmax of the CUDA step returns argmax's index, the first of tied maxima too."""
    gen = torch.Generator(device="cuda").manual_seed(vocab)
    for rows in (1, 8, 33):
        logits = (torch.randn(rows, vocab, device="cuda", generator=gen) * 2).round().to(torch.bfloat16)
        assert torch.equal(greedy(logits), logits.argmax(dim=-1))


@pytest.mark.parametrize("spec", ["full", "streaming:budget=0.3", "h2o:budget=0.3", "paged:block_size=16"])
def test_kernel_path_equals_module_path_in_fp32(tiny_fp32, spec):
    """Fused weights + Triton kernels (exact fp32 products) decode the transformers modules' greedy tokens."""
    trace = trace_for(tiny_fp32)
    modules = HFEngine(tiny_fp32, parse_strategy(spec), kernels=False).run(trace)
    fused = HFEngine(tiny_fp32, parse_strategy(spec)).run(trace)
    assert tokens(fused) == tokens(modules)
    assert fused.counters == modules.counters


@pytest.mark.parametrize("spec", WHOLE_BUDGET)
def test_whole_budget_reproduces_full_in_fp32(tiny_fp32, spec):
    """Every strategy with a budget that holds the whole context gives the full cache's greedy tokens on CUDA."""
    trace = trace_for(tiny_fp32)
    assert tokens(HFEngine(tiny_fp32, parse_strategy(spec)).run(trace)) == tokens(
        HFEngine(tiny_fp32, parse_strategy("full")).run(trace))


def test_fused_bf16_step_is_close_to_the_modules():
    """On the 1B shape in bf16 the fused step's logits stay within bf16 rounding of the module step's."""
    model = load_model("llama-1b", "cuda")
    trace = trace_for(model, num_requests=4, prompt_len=300, output_len=3)
    logits = []
    for kernels in (False, True):
        engine = HFEngine(model, parse_strategy("full"), kernels=kernels)
        prompt = list(trace.requests[0].prompt_ids)
        logits.append(engine.teacher_forced(prompt, 290))
    assert torch.nn.functional.cosine_similarity(logits[0], logits[1], dim=-1).min() > 0.999


def test_out_of_memory_frees_the_device_and_the_next_run_measures_alone():
    """A cache that cannot be allocated (the allocator capped below it) fails with one line naming the bytes; memory
    returns to where it was, and the next run's allocator peak is what it is on a fresh engine."""
    model = load_model("llama-1b", "cuda")
    small = trace_for(model, num_requests=4, prompt_len=200, output_len=8)

    def peak(engine):
        with MemoryWatcher("cuda") as watcher:
            engine.run(small)
        return watcher.report.allocator_peak_growth_bytes

    HFEngine(model, parse_strategy("full")).run(small)
    fresh = peak(HFEngine(model, parse_strategy("full")))
    before = torch.cuda.memory_allocated()
    huge = trace_for(model, num_requests=32, prompt_len=60000, output_len=1000, range_ratio=0.0)  # ~64 GiB of KV
    engine = HFEngine(model, parse_strategy("full"))
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((before + 8 * 2**30) / total)
    try:
        with pytest.raises(KVOutOfMemory) as info:
            engine.run(huge)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    message = str(info.value)
    assert "\n" not in message and "model llama-1b, strategy full, 32 slots" in message and "GiB" in message
    assert torch.cuda.memory_allocated() == before
    assert peak(engine) == fresh
