"""GPU assignment for pytest-xdist workers, on a simulated device list (no GPU needed)."""

import re

import pytest

from pytest_kvcache.devices import assign_gpu, pin_worker, visible_gpus, worker_index
from pytest_kvcache.errors import KVConfigError


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
