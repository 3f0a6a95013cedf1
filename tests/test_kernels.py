"""Runs tests/triton_checks.py in a process of its own: Triton's interpreter (CPU) is chosen when triton is first
imported, and in this process transformers has imported it already."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECKS = Path(__file__).with_name("triton_checks.py")


def test_triton_kernels_against_references():
    pytest.importorskip("triton", reason="the kernel checks need triton (pip install -e '.[dev]' brings it)")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                          str(CHECKS)], env=env, capture_output=True, text=True, cwd=CHECKS.parent.parent)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
