"""pytest plugin for the power benchmark: makes the hf engine's decode step slower by a planted factor.

Loaded on both sides of a compare with `-p benchmarks.plant_slowdown`; only sessions whose environment sets
KVBENCH_PLANT_SLOWDOWN (a fraction, e.g. 0.1 for 10%) are slowed, so the base side stays as it is. The wrapped
`HFEngine._decode` busy-waits `factor` times the time the step itself took: on CPU the thread's CPU clock, so the
planted cost is real CPU work of the step's own size and is not inflated by descheduling; on CUDA the wall clock
(the step ends in a device sync, and its time is the GPU's, not the thread's). Nothing in the product code knows
about it.
"""

from __future__ import annotations

import functools
import os
import time

VARIABLE = "KVBENCH_PLANT_SLOWDOWN"


def _slowed(decode, factor: float):
    @functools.wraps(decode)
    def step(self, *args, **kwargs):
        clock = time.perf_counter if self.model.device.type == "cuda" else time.thread_time
        start = clock()
        out = decode(self, *args, **kwargs)
        until = clock() + factor * (clock() - start)
        while clock() < until:
            pass
        return out

    return step


def pytest_configure(config) -> None:
    factor = float(os.environ.get(VARIABLE) or 0.0)
    if factor <= 0:
        return
    from pytest_kvcache.engines.hf import HFEngine

    HFEngine._decode = _slowed(HFEngine._decode, factor)
    config.addinivalue_line("markers", f"planted: {VARIABLE}={factor} slows HFEngine._decode")
