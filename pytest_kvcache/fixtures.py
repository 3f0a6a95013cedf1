"""Fixtures suites use: kv_model, kv_strategy, request_trace, memory_watcher and kv_bench (kv_quality and
kv_retrieval live in quality_fixture.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pytest_kvcache.baselines import Measurement, representative
from pytest_kvcache.bench import Bench
from pytest_kvcache.engines import engine_class
from pytest_kvcache.errors import KVMissingPackage
from pytest_kvcache.memory import MemoryWatcher
from pytest_kvcache.metrics import SLO
from pytest_kvcache.models import LoadedModel, load_model
from pytest_kvcache.plugin import kv_session
from pytest_kvcache.strategies import parse_strategy
from pytest_kvcache.strategies.base import KVStrategy
from pytest_kvcache.traces import Trace, TraceSpec, load_jsonl, synthetic


@pytest.fixture(scope="session")
def _kv_models(pytestconfig: pytest.Config) -> dict:
    return kv_session(pytestconfig).models


@pytest.fixture
def kv_model(request: pytest.FixtureRequest, _kv_models: dict) -> LoadedModel:
    """A loaded model, once per session per name: `tiny` (random Llama) by default, see --kv-model."""
    name = getattr(request, "param", None) or (request.config.getoption("kv_model") or ["tiny"])[0]
    if name not in _kv_models:
        try:
            _kv_models[name] = load_model(name, kv_session(request.config).device)
        except KVMissingPackage as missing:
            pytest.skip(str(missing))
    return _kv_models[name]


@pytest.fixture
def kv_strategy(request: pytest.FixtureRequest) -> KVStrategy:
    """The strategy under test, parsed from its spec (`full`, `streaming:budget=0.5,sinks=4`, ...)."""
    return parse_strategy(getattr(request, "param", "full"))


@pytest.fixture
def request_trace(pytestconfig: pytest.Config):
    """Factory: request_trace(model=..., rate=4.0, num_requests=16, ...) -> Trace; --kv-trace replaces it."""
    override = kv_session(pytestconfig).trace_override

    def make(model: LoadedModel | None = None, path: str | Path | None = None, vocab_size: int | None = None,
             **spec) -> Trace:
        vocab = model.vocab_size if model is not None else vocab_size or TraceSpec.vocab_size
        if override is not None:
            return override
        if path is not None:
            return load_jsonl(path, vocab_size=vocab)
        return synthetic(TraceSpec(vocab_size=vocab, **spec))

    return make


@pytest.fixture
def memory_watcher(pytestconfig: pytest.Config):
    """Factory: `with memory_watcher() as w: ...` then `w.report` (RSS on CPU; pynvml + allocator on GPU)."""
    device = kv_session(pytestconfig).device

    def make(interval_s: float = 0.01) -> MemoryWatcher:
        return MemoryWatcher(device, interval_s)

    return make


class KVBench:
    """Runs a trace through an engine for warm-up + N timed rounds, then gates the result on its baseline."""

    def __init__(self, request: pytest.FixtureRequest, benchmark) -> None:
        self.request = request
        self.benchmark = benchmark
        self.session = kv_session(request.config)

    def _engine(self, model: LoadedModel, strategy: KVStrategy, max_batch: int, kv_limit_bytes: int | None):
        """The strategy's engine from the registry (skipped, with the reason, where vLLM is unusable)."""
        if strategy.engine == "vllm":
            from pytest_kvcache.engines import vllm

            if not vllm.available():
                pytest.skip(vllm.INSTALL_HINT)
            if getattr(strategy, "gpu_only", False) and self.session.device != "cuda":
                pytest.skip(f"{strategy.name} offloads GPU KV to host memory: needs --gpu on a CUDA machine")
        return engine_class(strategy.engine)(model, strategy, max_batch=max_batch, kv_limit_bytes=kv_limit_bytes)

    def __call__(self, trace: Trace, model: LoadedModel, strategy: KVStrategy | str = "full", *,
                 max_batch: int = 32, kv_limit_bytes: int | None = None, slo: SLO = SLO(),
                 engine=None, extra_config: dict | None = None) -> Measurement:
        strategy = parse_strategy(strategy)
        engine = engine or self._engine(model, strategy, max_batch, kv_limit_bytes)
        rounds = self.request.config.getoption("kv_rounds")
        bench = Bench(engine, trace, torch.device(self.session.device), slo)
        calibration = self.session.calibration_s()
        bench.warmup()
        self.benchmark.group = self.request.node.module.__name__.rsplit(".", 1)[-1]
        self.benchmark.pedantic(bench.run_round, rounds=rounds, iterations=1, warmup_rounds=0)
        while len(bench.rounds) < rounds:
            bench.run_round()
        config = {
            "engine": type(engine).__name__,
            "model": model.name,
            "strategy": strategy.label(),
            "trace": trace.describe(),
            "max_batch": max_batch,
            "kv_limit_bytes": kv_limit_bytes,
            "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
            "rounds": rounds,
            **(extra_config or {}),
        }
        node = self.request.node
        measurement = bench.measurement(node.name, Path(str(node.path)).stem, config, calibration,
                                        self.session.machine())
        self.benchmark.extra_info.update(
            {name: representative(name, values) for name, values in measurement.metrics.items()
             if values and not math.isnan(representative(name, values))}
        )
        self.session.record(node, measurement)
        return measurement


@pytest.fixture
def kv_bench(request: pytest.FixtureRequest, benchmark) -> KVBench:
    """kv_bench(trace, model, strategy, kv_limit_bytes=...) -> Measurement; fails the test on a regression."""
    return KVBench(request, benchmark)
