"""GPU gating: gpu-marked tests skip without --gpu; --gpu without CUDA is a clear usage error."""

import pytest
import torch

GPU_SUITE = """
    import pytest

    @pytest.mark.gpu
    def test_on_gpu():
        pass

    def test_on_cpu():
        pass
"""


def test_gpu_tests_skip_without_flag_with_reason(pytester):
    """CPU CI must skip, not fail, GPU tests, and say how to run them."""
    pytester.makepyfile(test_suite=GPU_SUITE)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_suite.py:*: *--gpu*"])


def test_gpu_flag_without_cuda_is_a_usage_error(pytester, monkeypatch):
    """--gpu on a machine without CUDA stops at once with a sentence, not a traceback from a CUDA call."""
    # a no-op on this CPU-only machine; keeps the test meaningful where CUDA exists
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pytester.makepyfile(test_suite=GPU_SUITE)
    result = pytester.runpytest("-p", "no:cacheprovider", "--gpu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --gpu was given but no CUDA device is visible*"])
    assert "Traceback" not in "\n".join(result.outlines + result.errlines)
    assert "passed" not in result.stdout.str()

