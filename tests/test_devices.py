"""GPU assignment for pytest-xdist workers, on a simulated device list (no GPU needed)."""

import os
import re
from types import SimpleNamespace

import pytest

from pytest_kvcache.devices import assign_gpu, pin_worker, visible_gpus, worker_index
from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.plugin import pytest_configure, pytest_xdist_auto_num_workers


def test_each_worker_gets_its_own_gpu_from_the_visible_list():
    gpus = visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 5,7"})
    assert gpus == ["2", "5", "7"]
    assert [assign_gpu(f"gw{i}", gpus) for i in range(3)] == ["2", "5", "7"]
    assert visible_gpus({}, count=2) == ["0", "1"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_pinning_leaves_only_the_workers_gpu_visible():
    environ = {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert pin_worker("gw1", environ) == "1"
    assert environ["CUDA_VISIBLE_DEVICES"] == "1"


@pytest.mark.parametrize("worker,gpus,words", [
    ("gw2", ["0", "1"], "worker gw2 has no GPU of its own (2 visible): use -n 2 or -n auto"),
    ("gw0", [], "no GPU is visible"),
    ("master", ["0"], "not a pytest-xdist worker id"),
])
def test_more_workers_than_gpus_is_a_one_line_error(worker, gpus, words):
    with pytest.raises(KVConfigError, match=re.escape(words)) as info:
        assign_gpu(worker, gpus)
    assert "\n" not in str(info.value)
    assert worker_index("gw11") == 11



class GpuWorkerConfig(SimpleNamespace):
    """Just what pytest_configure reads before the CUDA check, for a --gpu xdist worker."""

    def getoption(self, name):
        return name == "gpu"

    def addinivalue_line(self, name, line):
        pass


def test_auto_workers_are_one_per_visible_gpu_and_only_with_gpu(monkeypatch):
    """`-n auto --gpu` asks the plugin, which counts the visible GPUs; without --gpu xdist decides (CPUs)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4")
    assert pytest_xdist_auto_num_workers(GpuWorkerConfig()) == 2
    assert pytest_xdist_auto_num_workers(SimpleNamespace(getoption=lambda name: False)) is None


def test_a_gpu_worker_is_pinned_before_cuda_is_asked_for(monkeypatch):
    """A --gpu xdist worker keeps only its own GPU visible before torch is asked for CUDA (none exists here, so
    the session then stops on the missing device); a worker with no GPU of its own is a usage error."""
    import torch

    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: seen.append(os.environ["CUDA_VISIBLE_DEVICES"]) or False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    with pytest.raises(pytest.UsageError, match="no CUDA device is visible"):
        pytest_configure(GpuWorkerConfig(workerinput={"workerid": "gw1"}))
    assert seen == ["7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6")
    with pytest.raises(pytest.UsageError, match="worker gw1 has no GPU of its own"):
        pytest_configure(GpuWorkerConfig(workerinput={"workerid": "gw1"}))
