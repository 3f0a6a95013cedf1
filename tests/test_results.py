"""results/ keeps every session's measurements for `kvbench diff` and `kvbench report`."""

import json
from datetime import datetime, timezone

from pytest_kvcache import machine, plugin

SUITE = """
    import math

    def test_small(kv_bench, kv_model, request_trace):
        trace = request_trace(model=kv_model, rate=math.inf, num_requests=2, prompt_len=16, output_len=4)
        kv_bench(trace, kv_model)
"""


def test_two_sessions_in_the_same_second_keep_both_results(pytester, monkeypatch):
    """Short sessions run back to back (CI steps, `-k` slices) must not overwrite each other's results file."""
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return moment

    monkeypatch.setattr(plugin, "datetime", Frozen)
    monkeypatch.setattr(machine, "calibrate", lambda device="cpu", repeats=5: 0.002)
    pytester.makepyfile(test_small=SUITE)
    results = pytester.path / "results"
    args = ["-p", "no:cacheprovider", "--benchmark-disable", "--kv-rounds", "1", "--kv-cpu", "off",
            "--kv-baselines", str(pytester.path / "baselines"), "--kv-results", str(results)]
    pytester.runpytest(*args).assert_outcomes(passed=1)
    pytester.runpytest(*args, "--kv-rounds", "2").assert_outcomes(passed=1)
    files = sorted(results.glob("kvcache-*.json"))
    assert len(files) == 2, [f.name for f in files]
    rounds = sorted(json.loads(f.read_text())["outcomes"][0]["entry"]["config"]["rounds"] for f in files)
    assert rounds == [1, 2]


OOM_SUITE = """
    import math

    from pytest_kvcache.errors import KVOutOfMemory

    class TooBig:
        def run(self, trace):
            raise KVOutOfMemory("tiny/full max_batch=32 kv_limit_bytes=1024: asked for 4096 B of KV, 1024 B free")

    def test_oom(kv_bench, kv_model, request_trace):
        trace = request_trace(model=kv_model, rate=math.inf, num_requests=2, prompt_len=8, output_len=2)
        kv_bench(trace, kv_model, engine=TooBig())

    def test_fits(kv_bench, kv_model, request_trace):
        trace = request_trace(model=kv_model, rate=math.inf, num_requests=2, prompt_len=8, output_len=2)
        kv_bench(trace, kv_model)
"""
OOM_MESSAGE = "tiny/full max_batch=32 kv_limit_bytes=1024: asked for 4096 B of KV, 1024 B free"


def test_out_of_memory_is_a_recorded_result(pytester, monkeypatch):
    """An engine that runs out of memory fails its test with its one line, and the configuration shows up in the
    summary and in the results file with status `out of memory`; the other tests carry on."""
    monkeypatch.setattr(machine, "calibrate", lambda device="cpu", repeats=5: 0.002)
    pytester.makepyfile(test_oom=OOM_SUITE)
    results = pytester.path / "results"
    result = pytester.runpytest("-p", "no:cacheprovider", "--benchmark-disable", "--kv-rounds", "1", "--kv-cpu", "off",
                                "--kv-baselines", str(pytester.path / "baselines"), "--kv-results", str(results))
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["test_oom[[]tiny[]] * out of memory",
                                 "FAILED test_oom.py::test_oom[[]tiny[]] - Failed: tiny/full max_batch=32*"])
    failure = result.stdout.str().split("_ test_oom[tiny] _")[1].split("=====")[0]
    assert failure.strip().splitlines()[-1] == OOM_MESSAGE
    assert "Traceback" not in failure and "During handling" not in failure
    outcomes = {o["test_id"]: o for o in json.loads((results / "latest.json").read_text())["outcomes"]}
    oom = outcomes["test_oom[tiny]"]
    assert (oom["status"], oom["error"], oom["entry"]["metrics"]) == ("out of memory", OOM_MESSAGE, {})
    assert oom["entry"]["config"]["engine"] == "TooBig" and oom["entry"]["config"]["model"] == "tiny"
    assert outcomes["test_fits[tiny]"]["status"] == "new"
