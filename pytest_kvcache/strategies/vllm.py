"""vLLM's own KV-cache management, selected like the hf strategies but run by the real vLLM engine.

`vllm`: its paged cache (Kwon et al., SOSP 2023) with V1's preemption by recompute; `vllm-prefix`: the same with
automatic prefix caching; `vllm-offload`: KV offloading to host memory (`kv_offloading_size` GiB through
`kv_offloading_backend`; GPU only). `kv_cache_memory_bytes` (or the engine's KV limit) sets memory pressure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.strategies.base import KVStrategy

DEFAULT_KV_BYTES = 64 * 2**20
OFFLOADING_BACKENDS = ("native", "lmcache")  # vLLM's CacheConfig.kv_offloading_backend choices


def _positive_int(name: str, value: object, low: int, high: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise KVConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class VLLM(KVStrategy):
    """kv_cache_memory_bytes: KV pool size (default: the kv_bench limit, else 64 MiB); gpu_memory_utilization:
    fraction of GPU memory instead (GPU); block_size: tokens per block (None: vLLM's default, 128 on CPU);
    max_num_seqs: requests running at once (None: the engine's max_batch); max_num_batched_tokens: tokens per
    scheduler step; tensor_parallel_size: GPUs one model is split over (vLLM's tensor parallelism; GPU only)."""

    name = "vllm"
    engine: ClassVar[str] = "vllm"
    reserves_slots = False
    prefix_caching: ClassVar[bool] = False
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float | None = None
    block_size: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int = 2048
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _positive_int(f"{self.name}: kv_cache_memory_bytes", self.kv_cache_memory_bytes, 1, 2**50)
        _positive_int(f"{self.name}: block_size", self.block_size, 1, 1024)
        _positive_int(f"{self.name}: max_num_seqs", self.max_num_seqs, 1, 4096)
        _positive_int(f"{self.name}: max_num_batched_tokens", self.max_num_batched_tokens, 1, 2**20)
        _positive_int(f"{self.name}: tensor_parallel_size", self.tensor_parallel_size, 1, 64)
        util = self.gpu_memory_utilization
        if util is not None and (isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1):
            raise KVConfigError(f"{self.name}: gpu_memory_utilization must be a fraction in (0, 1], got {util!r}")

    def kv_pool_bytes(self, kv_limit_bytes: int | None) -> int | None:
        """Bytes of the KV pool vLLM gets (None: sized by gpu_memory_utilization, unknown before start-up)."""
        if self.gpu_memory_utilization is not None:
            return None
        return self.kv_cache_memory_bytes or kv_limit_bytes or DEFAULT_KV_BYTES

    def vllm_args(self, kv_limit_bytes: int | None, device: str) -> dict:
        """Engine arguments this strategy sets (memory pressure, batching, block size, prefix caching, offloading)."""
        args: dict = {"enable_prefix_caching": self.prefix_caching,
                      "max_num_batched_tokens": self.max_num_batched_tokens}
        if self.max_num_seqs is not None:
            args["max_num_seqs"] = self.max_num_seqs
        if self.gpu_memory_utilization is not None:
            if device != "cuda":
                raise KVConfigError(f"{self.name}: gpu_memory_utilization needs --gpu; use kv_cache_memory_bytes on CPU")
            args["gpu_memory_utilization"] = float(self.gpu_memory_utilization)
        else:
            args["kv_cache_memory_bytes"] = self.kv_pool_bytes(kv_limit_bytes)
        if self.block_size is not None:
            args["block_size"] = self.block_size
        if self.tensor_parallel_size > 1:
            if device != "cuda":
                raise KVConfigError(f"{self.name}: tensor_parallel_size > 1 splits the model over GPUs: needs --gpu")
            args["tensor_parallel_size"] = self.tensor_parallel_size
        return args


@dataclass(frozen=True)
class VLLMPrefix(VLLM):
    """vLLM with automatic prefix caching: requests sharing a prompt prefix reuse its cached blocks."""

    name = "vllm-prefix"
    prefix_caching: ClassVar[bool] = True


@dataclass(frozen=True)
class VLLMOffload(VLLM):
    """vLLM offloading KV blocks to host memory (GPU only): kv_offloading_size GiB of host memory."""

    name = "vllm-offload"
    gpu_only: ClassVar[bool] = True
    kv_offloading_size: float = 4.0
    kv_offloading_backend: str = "native"

    def __post_init__(self) -> None:
        super().__post_init__()
        size = self.kv_offloading_size
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 < size <= 4096:
            raise KVConfigError(f"vllm-offload: kv_offloading_size must be in (0, 4096] GiB, got {size!r}")
        if self.kv_offloading_backend not in OFFLOADING_BACKENDS:
            raise KVConfigError(f"vllm-offload: kv_offloading_backend must be one of {', '.join(OFFLOADING_BACKENDS)}, "
                                f"got {self.kv_offloading_backend!r}")

    def vllm_args(self, kv_limit_bytes: int | None, device: str) -> dict:
        if device != "cuda":
            raise KVConfigError("vllm-offload offloads GPU KV to host memory: run it with --gpu")
        return {**super().vllm_args(kv_limit_bytes, device), "kv_offloading_size": float(self.kv_offloading_size),
                "kv_offloading_backend": self.kv_offloading_backend}
