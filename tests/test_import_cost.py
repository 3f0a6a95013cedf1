"""The plugin costs nothing to pytest sessions that do not use it: no torch, transformers or scipy at import, no
torch threads pinned, no CPU affinity changed; a kv fixture pins the process to one CPU and records it."""

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "scipy")


def test_importing_the_entry_points_imports_nothing_heavy():
    code = ("import sys, pytest_kvcache.plugin, pytest_kvcache.fixtures; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_session_without_kv_tests_keeps_torch_and_affinity_as_they_were(pytester):
    """Nothing heavy is loaded for a plain test; torch's own thread count and the CPU set are left alone."""
    default = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True, check=True).stdout.strip()
    pytester.makepyfile(test_plain=f"""
        import os, sys

        def test_plain():
            assert not {{m for m in {HEAVY!r} if m in sys.modules}}
            import torch
            assert torch.get_num_threads() == {default}
            assert os.sched_getaffinity(0) == {os.sched_getaffinity(0)!r}
    """)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_help_lists_model_names_without_torch(pytester):
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["*--kv-model=NAMES*"])
    assert "llama-8b" in result.stdout.str() and "smollm2" in result.stdout.str()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux only")
def test_a_kv_fixture_pins_the_process_to_one_cpu_and_records_it(pytester):
    pytester.makepyfile(test_pinned="""
        import math, os

        def test_pinned(kv_bench, kv_model, request_trace):
            trace = request_trace(model=kv_model, rate=math.inf, num_requests=2, prompt_len=8, output_len=2)
            kv_bench(trace, kv_model)
            assert len(os.sched_getaffinity(0)) == 1
    """)
    results = pytester.path / "results"
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "--benchmark-disable", "--kv-rounds", "2",
                                  "--kv-results", str(results), "--kv-baselines",
                                  str(pytester.path / "b")).assert_outcomes(passed=1)
    (outcome,) = json.loads((results / "latest.json").read_text())["outcomes"]
    cpus = outcome["entry"]["info"]["cpus"]
    assert len(cpus) == 2 and set(cpus) <= os.sched_getaffinity(0)
