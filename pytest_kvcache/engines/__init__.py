"""Engine registry: the name a strategy's `engine` attribute gives -> the class that replays traces under it.

An unknown name is an error, never a silent fall-back to the hf engine.
"""

from __future__ import annotations

import importlib

from pytest_kvcache.errors import KVConfigError

ENGINES = {
    "hf": "pytest_kvcache.engines.hf:HFEngine",
    "vllm": "pytest_kvcache.engines.vllm:VLLMEngine",
}


def engine_class(name: str) -> type:
    """The engine class registered as `name` (imported on first use: vLLM's is heavy)."""
    if name not in ENGINES:
        raise KVConfigError(f"unknown engine {name!r}: choose one of {', '.join(sorted(ENGINES))}")
    module, _, attr = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), attr)
