"""MemoryWatcher: real memory readings during a run (pynvml + torch allocator on GPU, process RSS on CPU).

A measurement must not inherit what ran before: on entry the allocator's cache is emptied and its peak reset, and
every peak is also reported relative to the level at the start (growth), beside the absolute reading.
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, field

import psutil
import torch


@dataclass
class MemoryReport:
    """Peaks in bytes; device figures are None on CPU. timeline holds (seconds, bytes) samples."""

    start_rss_bytes: int
    peak_rss_bytes: int
    peak_device_bytes: int | None = None
    start_device_bytes: int | None = None
    allocator_peak_bytes: int | None = None
    start_allocated_bytes: int | None = None
    reserved_peak_bytes: int | None = None
    start_reserved_bytes: int | None = None
    timeline: list[tuple[float, int]] = field(default_factory=list)

    @property
    def peak_device_growth_bytes(self) -> int | None:
        """Device memory in use at the peak minus at the start (pynvml: every process on the GPU)."""
        return None if self.peak_device_bytes is None else self.peak_device_bytes - self.start_device_bytes

    @property
    def reserved_peak_growth_bytes(self) -> int | None:
        """Device memory this process's allocator held at its peak minus at the start (cache emptied on entry)."""
        return None if self.reserved_peak_bytes is None else self.reserved_peak_bytes - self.start_reserved_bytes

    @property
    def outside_allocator_growth_bytes(self) -> int | None:
        """The part of the pynvml growth no allocator reserve explains: kernels loaded on first launch (CUDA's lazy
        module loading), library handles and graph executables; it depends on what the process ran before."""
        if self.peak_device_bytes is None or self.reserved_peak_bytes is None:
            return None
        return max(0, self.peak_device_growth_bytes - self.reserved_peak_growth_bytes)

    @property
    def allocator_peak_growth_bytes(self) -> int | None:
        """This process's tensors at the allocator's peak minus those alive at the start."""
        return None if self.allocator_peak_bytes is None else self.allocator_peak_bytes - self.start_allocated_bytes


def _nvml_handle(device: torch.device):
    import pynvml

    pynvml.nvmlInit()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)


class MemoryWatcher:
    """Context manager sampling memory every `interval_s` in a thread; peaks are exact for the allocator."""

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.01) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.report: MemoryReport | None = None
        self._stop = threading.Event()
        self._rss_start = 0
        self._samples: list[tuple[float, int]] = []
        self._rss_peak = 0
        self._thread: threading.Thread | None = None
        self._nvml = None
        self._device_start = self._allocated_start = self._reserved_start = None

    def _read(self) -> int:
        if self._nvml is not None:
            pynvml, handle = self._nvml
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        return psutil.Process().memory_info().rss

    def _sample(self) -> None:
        process = psutil.Process()
        t0 = time.perf_counter()
        while True:
            self._rss_peak = max(self._rss_peak, process.memory_info().rss)
            self._samples.append((time.perf_counter() - t0, self._read()))
            if self._stop.wait(self.interval_s):
                break

    def __enter__(self) -> MemoryWatcher:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._nvml = _nvml_handle(self.device)
            self._device_start = self._read()
            self._allocated_start = int(torch.cuda.memory_allocated(self.device))
            self._reserved_start = int(torch.cuda.memory_reserved(self.device))
        self._rss_start = psutil.Process().memory_info().rss
        self._thread = threading.Thread(target=self._sample, name="kvcache-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._stop.set()
        self._thread.join()
        self._rss_peak = max(self._rss_peak, psutil.Process().memory_info().rss)
        device_peak = allocator_peak = reserved_peak = None
        if self._nvml is not None:
            device_peak = max(b for _, b in self._samples)
            allocator_peak = int(torch.cuda.max_memory_allocated(self.device))
            reserved_peak = int(torch.cuda.max_memory_reserved(self.device))
        self.report = MemoryReport(self._rss_start, self._rss_peak, device_peak, self._device_start, allocator_peak,
                                   self._allocated_start, reserved_peak, self._reserved_start, self._samples)
