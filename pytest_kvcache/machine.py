"""Which machine a measurement came from, and how fast it is right now (the calibration workload)."""

from __future__ import annotations

import os
import platform
import re
import time
from importlib.metadata import PackageNotFoundError, version

import psutil
import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_id(device: torch.device | str = "cpu") -> str:
    """Baseline folder name: `cpu-x86_64`, or the GPU's name, e.g. `nvidia-h100-80gb-hbm3`."""
    device = torch.device(device)
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return f"cpu-{platform.machine()}"


def _package(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def fingerprint(device: torch.device | str = "cpu") -> dict:
    """What a baseline is only comparable with: hardware and the library versions that set the speed."""
    device = torch.device(device)
    info = {
        "machine_id": machine_id(device),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _package("transformers"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30), cuda=torch.version.cuda)
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as e:  # noqa: BLE001 - NVML missing is recorded, not fatal
            info["driver"] = f"unknown ({type(e).__name__})"
    return info


COMPARED_KEYS = ("cpu", "cores", "gpu", "torch", "transformers", "driver")


def fingerprint_mismatch(baseline: dict, current: dict) -> list[str]:
    """Human-readable differences between two fingerprints on the keys that change speed."""
    return [
        f"{key}: baseline {baseline.get(key)!r}, here {current.get(key)!r}"
        for key in COMPARED_KEYS
        if baseline.get(key) != current.get(key)
    ]


def _cpu_workload() -> None:
    a = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    acc = []
    for _ in range(150):
        a = torch.softmax(a @ a.T, dim=-1)
        acc.append(float(a[0, 0]))


def _gpu_workload(device: torch.device) -> None:
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    for _ in range(20):
        a = torch.tanh(a @ a)
    torch.cuda.synchronize(device)


def calibrate(device: torch.device | str = "cpu", repeats: int = 31) -> float:
    """Fastest of `repeats` timings of a fixed workload (the minimum is the least disturbed by other load); time
    metrics are compared relative to it, so a slower machine is not read as a regression."""
    device = torch.device(device)
    run = (lambda: _gpu_workload(device)) if device.type == "cuda" else _cpu_workload
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)
