"""Machine identity, the calibration workload, and the CPU pinning that keeps busy neighbours off the benchmark."""

import os
import platform

import pytest

from pytest_kvcache import machine
from pytest_kvcache.machine import CpuPin, calibrate, fingerprint, fingerprint_mismatch, machine_id, run_delay_s


def test_cpu_machine_id_names_the_baseline_folder():
    """CPU baselines live in cpu-<arch>, e.g. baselines/cpu-x86_64."""
    assert machine_id("cpu") == f"cpu-{platform.machine()}"


def test_fingerprint_records_what_sets_the_speed():
    """A baseline carries the hardware and library versions it is only comparable with."""
    info = fingerprint("cpu")
    assert info["machine_id"] == machine_id("cpu")
    assert {"cpu", "cores", "memory_gib", "python", "torch", "transformers"} <= set(info)
    assert fingerprint_mismatch(info, dict(info)) == []


def test_fingerprint_mismatch_names_each_differing_key():
    """Only keys that change speed are compared, each reported with both values."""
    base = {"cpu": "A", "cores": 2, "torch": "2.13", "python": "3.11"}
    here = {"cpu": "B", "cores": 2, "torch": "2.14", "python": "3.12"}
    assert fingerprint_mismatch(base, here) == ["cpu: baseline 'A', here 'B'", "torch: baseline '2.13', here '2.14'"]


def test_calibration_is_a_positive_duration():
    """The calibration workload returns seconds, the unit the gate divides by."""
    seconds = calibrate("cpu", repeats=3)
    assert isinstance(seconds, float) and seconds > 0


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/schedstat"), reason="Linux schedstat only")
def test_run_delay_is_read_from_schedstat():
    delay = run_delay_s()
    assert delay is not None and delay >= 0


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux only")
def test_pin_moves_to_the_cpu_others_used_least(monkeypatch):
    """After a disturbed round the pin goes where the foreign busy time was lowest; a fixed pin stays."""
    original = os.sched_getaffinity(0)
    pinned = []
    monkeypatch.setattr(machine.os, "sched_setaffinity", lambda pid, cpus: pinned.append(set(cpus)))
    busy = iter([[10.0, 10.0], [10.9, 11.0]])  # CPU 0: 0.9 s busy (ours ~0), CPU 1: 1.0 s
    monkeypatch.setattr(machine, "_busy", lambda t: t)
    monkeypatch.setattr(machine.psutil, "cpu_times", lambda percpu: next(busy))
    pin = CpuPin([0, 1], cpu=1)
    pin.mark()
    assert pin.move_away() == 0 and pin.moves == 1 and pinned == [{0}]
    fixed = CpuPin([0, 1], cpu=1, fixed=True)
    assert fixed.move_away() == 1
    assert os.sched_getaffinity(0) == original
