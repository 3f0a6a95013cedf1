"""Machine identity and the calibration workload behind cross-machine comparisons."""

import platform

from pytest_kvcache.machine import calibrate, fingerprint, fingerprint_mismatch, machine_id


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
    """The calibration workload returns seconds, the unit compare() divides by."""
    seconds = calibrate("cpu", repeats=3)
    assert isinstance(seconds, float) and seconds > 0
