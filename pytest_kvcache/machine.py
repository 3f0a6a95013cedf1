"""Which machine a measurement came from, how fast it is right now (calibration), and which CPU it runs on.

On a small shared machine the biggest timing error is another process taking turns on the benchmark's core: the
benchmark then takes 2x the wall time (and more CPU time, from the lost caches). The benchmark process is therefore
pinned to one CPU (the idlest when the first kv fixture runs), and a round during which its thread waited to run
for more than DISTURBED_FRACTION of the time is repeated on the CPU the others used least.
"""

from __future__ import annotations

import os
import platform
import re
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil

DISTURBED_FRACTION = 0.10  # run-queue wait / wall time of a round above which the round is measured again
SCHEDSTAT = Path("/proc/thread-self/schedstat")


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


def machine_id(device: str = "cpu") -> str:
    """Baseline folder name: `cpu-x86_64`, or the GPU's name, e.g. `nvidia-h100-80gb-hbm3`."""
    if str(device).startswith("cuda"):
        import torch

        return _slug(torch.cuda.get_device_name(torch.device(device)))
    return f"cpu-{platform.machine()}"


def _package(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def fingerprint(device: str = "cpu") -> dict:
    """What a baseline is only comparable with: hardware and the library versions that set the speed."""
    import torch

    info = {
        "machine_id": machine_id(device),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _package("transformers"),
    }
    if str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
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
    import torch

    a = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    for _ in range(150):
        a = torch.softmax(a @ a.T, dim=-1)
        float(a[0, 0])


def _gpu_workload(device: str) -> None:
    import torch

    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    for _ in range(20):
        a = torch.tanh(a @ a)
    torch.cuda.synchronize(device)


def calibrate(device: str = "cpu", repeats: int = 5) -> float:
    """Median of `repeats` timings (seconds) of a fixed workload; taken between rounds, so it sees the load the
    rounds saw. Time metrics are compared relative to it across sessions, within CALIBRATION_RANGE."""
    run = (lambda: _gpu_workload(device)) if str(device).startswith("cuda") else _cpu_workload
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_delay_s() -> float | None:
    """Seconds this thread has spent runnable but waiting for a CPU (Linux schedstat), or None if unknown."""
    try:
        return int(SCHEDSTAT.read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def _busy(times) -> float:
    return times.user + times.system + getattr(times, "nice", 0.0) + getattr(times, "irq", 0.0) + \
        getattr(times, "softirq", 0.0)


@dataclass
class CpuPin:
    """Keeps this process on one CPU of its allowed set and moves it, between rounds, to the CPU that other
    processes used least. `fixed`: stay where put (a CPU given by the user, or an xdist worker's own CPU)."""

    allowed: list[int]
    cpu: int | None = None
    fixed: bool = False
    moves: int = 0
    futile: int = 0
    _mark: tuple[list[float], float] | None = field(default=None, repr=False)

    def pin(self, cpu: int | None = None) -> int | None:
        """Pin to `cpu`, or to the idlest allowed CPU over a 0.2 s look; returns the CPU (None: cannot pin)."""
        if not self.allowed or not hasattr(os, "sched_setaffinity"):
            return None
        if cpu is None:
            load = psutil.cpu_percent(interval=0.2, percpu=True)
            cpu = min(self.allowed, key=lambda c: (load[c] if c < len(load) else 100.0, c))
        os.sched_setaffinity(0, {cpu})
        self.cpu = cpu
        return cpu

    def mark(self) -> None:
        """Start of a round: remember every CPU's busy time and this process's CPU time."""
        self._mark = ([_busy(t) for t in psutil.cpu_times(percpu=True)], time.process_time())

    def move_away(self) -> int | None:
        """After a disturbed round: go to the allowed CPU with the least foreign busy time since `mark`."""
        if self.fixed or self.cpu is None or self._mark is None or len(self.allowed) < 2:
            return self.cpu
        before, own_before = self._mark
        now = [_busy(t) for t in psutil.cpu_times(percpu=True)]
        own = time.process_time() - own_before
        foreign = {c: now[c] - before[c] - (own if c == self.cpu else 0.0) for c in self.allowed if c < len(now)}
        target = min(foreign, key=lambda c: (foreign[c], c != self.cpu))
        if target != self.cpu:
            self.moves += 1
            self.pin(target)
        return self.cpu
