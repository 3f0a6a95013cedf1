"""Which GPU a pytest-xdist worker measures on: one worker per visible GPU, chosen before CUDA starts.

`pytest suites/ --gpu -n auto` starts one worker per GPU (plugin.py: pytest_xdist_auto_num_workers); each worker keeps only its own GPU in
CUDA_VISIBLE_DEVICES before anything initialises CUDA, so two workers never share a GPU and every worker's
`cuda:0` is a different physical device.
"""

from __future__ import annotations

import os
import re

from pytest_kvcache.errors import KVConfigError


def visible_gpus(environ: dict[str, str] | None = None, count: int | None = None) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries: the variable's list, else 0..count-1 with
    count from NVML (so CUDA is not initialised to count them)."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()]
    if count is None:
        count = _nvml_count()
    return [str(i) for i in range(count)]


def _nvml_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:  # noqa: BLE001 - no driver or no NVML: no GPU to hand out
        return 0


def worker_index(worker_id: str) -> int:
    """0 for xdist's 'gw0', 1 for 'gw1', ..."""
    found = re.fullmatch(r"gw(\d+)", worker_id)
    if found is None:
        raise KVConfigError(f"not a pytest-xdist worker id: {worker_id!r}")
    return int(found.group(1))


def assign_gpu(worker_id: str, gpus: list[str]) -> str:
    """The one GPU a worker gets; more workers than GPUs would share one and their timings would be meaningless."""
    index = worker_index(worker_id)
    if not gpus:
        raise KVConfigError("--gpu with pytest-xdist: no GPU is visible to hand to the workers")
    if index >= len(gpus):
        raise KVConfigError(f"--gpu with pytest-xdist: worker {worker_id} has no GPU of its own ({len(gpus)} visible): "
                            f"use -n {len(gpus)} or -n auto")
    return gpus[index]


def pin_worker(worker_id: str, environ: dict[str, str] | None = None) -> str:
    """Keep only this worker's GPU visible (call before CUDA is initialised); returns its CUDA_VISIBLE_DEVICES entry."""
    environ = os.environ if environ is None else environ
    gpu = assign_gpu(worker_id, visible_gpus(environ))
    environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu
