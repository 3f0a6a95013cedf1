"""The bandwidth roofline of a decode step: bytes it must read (weights + valid KV) over the copy bandwidth
measured on the same GPU in the same process."""

from __future__ import annotations

import functools

import torch

from pytest_kvcache.models import LoadedModel


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device: str) -> float:
    """Bytes per second of a 2 GiB device-to-device copy, counting bytes read + written (median of 20, timed with
    CUDA events after a warm-up): the ceiling a memory-bound decode step is held against."""
    dev = torch.device(device)
    src = torch.empty(2**30, dtype=torch.int16, device=dev).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    times.sort()
    return 2 * 2**31 / times[len(times) // 2]


def weight_bytes(model: LoadedModel) -> int:
    """Weight bytes one decode step reads: every parameter but the input embedding table (a step reads only its
    rows; tied with the output head, the table is read in full by the head and counted once)."""
    embedding = model.model.model.embed_tokens.weight
    seen, total = set(), 0
    for parameter in model.model.parameters():
        if parameter.data_ptr() in seen:
            continue
        seen.add(parameter.data_ptr())
        total += parameter.numel() * parameter.element_size()
    tied = model.model.lm_head.weight.data_ptr() == embedding.data_ptr()
    return total if tied else total - embedding.numel() * embedding.element_size()
