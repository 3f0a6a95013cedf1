"""Fixtures suites use: kv_model, kv_strategy, request_trace, memory_watcher and kv_bench (kv_quality and
kv_retrieval live in quality_fixture.py).

Heavy modules (torch, transformers, the engines) are imported when a fixture first runs, not with this module.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_kvcache.errors import KVMissingPackage, KVOutOfMemory
from pytest_kvcache.metrics import SLO
from pytest_kvcache.plugin import kv_session
from pytest_kvcache.results import OUT_OF_MEMORY, Measurement, representative
from pytest_kvcache.traces import Trace, TraceSpec, load_jsonl, synthetic

if TYPE_CHECKING:
    from pytest_kvcache.models import LoadedModel
    from pytest_kvcache.strategies.base import KVStrategy


@pytest.fixture(scope="session")
def _kv_models(pytestconfig: pytest.Config) -> dict:
    return kv_session(pytestconfig).models


@pytest.fixture
def kv_model(request: pytest.FixtureRequest, _kv_models: dict) -> LoadedModel:
    """A loaded model, once per session per name: `tiny` (random Llama) by default, see --kv-model and --kv-dtype."""
    import torch

    from pytest_kvcache.models import load_model

    session = kv_session(request.config)
    session.start()
    name = getattr(request, "param", None) or (request.config.getoption("kv_model") or ["tiny"])[0]
    if name not in _kv_models:
        try:
            dtype = request.config.getoption("kv_dtype")
            _kv_models[name] = load_model(name, session.device, getattr(torch, dtype) if dtype else None)
        except KVMissingPackage as missing:
            pytest.skip(str(missing))
    return _kv_models[name]


@pytest.fixture
def kv_strategy(request: pytest.FixtureRequest) -> KVStrategy:
    """The strategy under test, parsed from its spec (`full`, `streaming:budget=0.5,sinks=4`, ...)."""
    from pytest_kvcache.strategies import parse_strategy

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
    from pytest_kvcache.memory import MemoryWatcher

    device = kv_session(pytestconfig).device

    def make(interval_s: float = 0.01) -> MemoryWatcher:
        return MemoryWatcher(device, interval_s)

    return make


def trace_identity(trace: Trace) -> dict:
    """What makes two traces the same workload: the generator spec (if any) and a hash of every request."""
    digest = hashlib.sha256()
    for r in trace.requests:
        digest.update(json.dumps([r.id, r.arrival_s, list(r.prompt_ids), r.max_new_tokens]).encode())
    spec = None
    if trace.spec is not None:  # strict JSON has no infinity: rate=inf (all at t=0) is written "inf"
        spec = {k: ("inf" if v == math.inf else v) for k, v in trace.describe().items() if k != "source"}
    return {"spec": spec, "requests": len(trace), "sha256": digest.hexdigest()[:16]}


def _node(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.node.name, Path(str(request.node.path)).stem


class KVBench:
    """Runs a trace through an engine for warm-up + N timed rounds, then gates the result on its baseline."""

    def __init__(self, request: pytest.FixtureRequest, benchmark) -> None:
        self.request = request
        self.benchmark = benchmark
        self.session = kv_session(request.config)
        self.session.start()
        self.session.pin_cpu()

    def _engine_class(self, strategy: KVStrategy) -> type:
        """The strategy's engine from the registry (skipped, with the reason, where vLLM is unusable)."""
        from pytest_kvcache.engines import engine_class

        if strategy.engine == "vllm":
            from pytest_kvcache.engines import vllm

            if not vllm.available():
                pytest.skip(vllm.INSTALL_HINT)
            if getattr(strategy, "gpu_only", False) and self.session.device != "cuda":
                pytest.skip(f"{strategy.name} offloads GPU KV to host memory: needs --gpu on a CUDA machine")
        return engine_class(strategy.engine)

    def configuration(self, engine: str, trace: Trace, model: LoadedModel, strategy: KVStrategy, max_batch: int,
                      kv_limit_bytes: int | None, slo: SLO, extra: dict | None) -> dict:
        """What a measurement is comparable on: its hash decides 'not comparable'."""
        import torch

        return {
            "engine": engine,
            "device": self.session.device,
            "model": model.name,
            "dtype": str(model.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "workers": self.session.workers,
            "rounds": self.request.config.getoption("kv_rounds"),
            "strategy": strategy.label(),
            "trace": trace_identity(trace),
            "max_batch": max_batch,
            "kv_limit_bytes": kv_limit_bytes,
            "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
            **(extra or {}),
        }

    def __call__(self, trace: Trace, model: LoadedModel, strategy: KVStrategy | str = "full", *,
                 max_batch: int = 32, kv_limit_bytes: int | None = None, slo: SLO = SLO(),
                 engine=None, extra_config: dict | None = None) -> Measurement:
        from pytest_kvcache import machine
        from pytest_kvcache.bench import Bench
        from pytest_kvcache.strategies import parse_strategy

        strategy = parse_strategy(strategy)
        cls = type(engine) if engine is not None else self._engine_class(strategy)
        config = self.configuration(cls.__name__, trace, model, strategy, max_batch, kv_limit_bytes, slo,
                                    extra_config)
        test_id, suite = _node(self.request)
        rounds = config["rounds"]
        device = self.session.device
        try:
            if engine is None:
                engine = cls(model, strategy, max_batch=max_batch, kv_limit_bytes=kv_limit_bytes)
            bench = Bench(engine, trace, device, slo, self.session.pin, lambda: machine.calibrate(device),
                          label=self.request.node.nodeid)
            bench.warmup()
            self.benchmark.group = suite
            self.benchmark.pedantic(bench.run_round, rounds=rounds, iterations=1, warmup_rounds=0)
            while len(bench.rounds) < rounds:
                bench.run_round()
        except KVOutOfMemory as e:
            out_of_memory = str(e)
        else:
            out_of_memory = None
        self._fail_if_out_of_memory(config, out_of_memory)
        return self._record(bench.measurement(test_id, suite, config, self.session.machine()))

    def capacity(self, trace_at: Callable[[float], Trace], model: LoadedModel, strategy: KVStrategy | str = "full",
                 *, low: float, high: float, bisections: int = 3, max_batch: int = 32,
                 kv_limit_bytes: int | None = None, slo: SLO = SLO(), extra_config: dict | None = None) -> Measurement:
        """The highest request rate in [low, high] that meets `slo` (capacity.search), one replay per probed rate of
        the same requests (`trace_at(rate)`), on one engine warmed up once; metric `capacity_rps`, probes in info."""
        from pytest_kvcache import machine
        from pytest_kvcache.bench import Bench, round_metrics
        from pytest_kvcache.capacity import Probe, meets, search
        from pytest_kvcache.stats import median
        from pytest_kvcache.strategies import parse_strategy

        strategy = parse_strategy(strategy)
        cls = self._engine_class(strategy)
        base = trace_at(low)
        plan = {"study": "capacity", "search": {"low": low, "high": high, "bisections": bisections, "percentile": 90}}
        config = self.configuration(cls.__name__, base, model, strategy, max_batch, kv_limit_bytes, slo,
                                    {**plan, **(extra_config or {})})
        test_id, suite = _node(self.request)
        device = self.session.device
        calibrations = []

        def probe(rate: float) -> Probe:
            bench = Bench(engine, trace_at(rate), device, slo, self.session.pin,
                          label=f"{self.request.node.nodeid}@{rate:.6g}")
            bench.run_round()
            summary = round_metrics(bench.rounds[0], slo, device)
            ttft, tpot = summary.get("ttft_p90_ms", math.inf), summary.get("tpot_p90_ms", math.inf)
            return Probe(rate, ttft, tpot, meets(slo, ttft, tpot))

        try:
            engine = cls(model, strategy, max_batch=max_batch, kv_limit_bytes=kv_limit_bytes)
            Bench(engine, base, device, slo).warmup()
            calibrations.append(machine.calibrate(device))
            self.benchmark.group = suite  # pytest-benchmark times the whole search, once
            found = self.benchmark.pedantic(search, args=(probe, low, high, bisections), rounds=1, iterations=1)
            calibrations.append(machine.calibrate(device))
        except KVOutOfMemory as e:
            out_of_memory = str(e)
        else:
            out_of_memory = None
        self._fail_if_out_of_memory(config, out_of_memory)
        info = {"capacity_probes": [p.to_json() for p in found.probes], "capacity_censored": found.censored}
        measurement = Measurement(test_id, suite, config, {"capacity_rps": [found.rate]},
                                  median(calibrations), self.session.machine(), info)
        return self._record(measurement)

    def _fail_if_out_of_memory(self, config: dict, message: str | None) -> None:
        """Out of memory is a result: recorded in the results file and the summary, then the test fails (outside
        the except block, so the failure is one line, not a chained traceback)."""
        if message is None:
            return
        test_id, suite = _node(self.request)
        failed = Measurement(test_id, suite, config, {}, None, self.session.machine())
        self.session.record_error(self.request.node, failed, message, OUT_OF_MEMORY)
        pytest.fail(message, pytrace=False)

    def _record(self, measurement: Measurement) -> Measurement:
        self.benchmark.extra_info.update(
            {name: representative(name, values) for name, values in measurement.metrics.items()
             if values and not math.isnan(representative(name, values))}
        )
        self.session.record(self.request.node, measurement)
        return measurement


@pytest.fixture
def kv_bench(request: pytest.FixtureRequest, benchmark) -> KVBench:
    """kv_bench(trace, model, strategy, kv_limit_bytes=...) -> Measurement; fails the test on a regression.
    kv_bench.capacity(trace_at, model, strategy, low=..., high=...) searches the highest rate that meets the SLO."""
    return KVBench(request, benchmark)
