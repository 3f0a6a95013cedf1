"""Every CPU suite test `make bench` and `make quality` run has a committed baseline, so each configuration is gated
(`sweep` tests are characterization, run on request)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MACHINE = "cpu-x86_64"


def _collected() -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "suites", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "not gpu and not sweep"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    return [line for line in out.splitlines() if "::" in line]


def test_suites_collect_and_have_cpu_baselines():
    """A new suite test without a baseline would only ever report `new` and never gate anything."""
    nodeids = _collected()
    assert nodeids, "suites/ collected no tests"
    missing = []
    for nodeid in nodeids:
        path, _, name = nodeid.partition("::")
        baseline = ROOT / "baselines" / MACHINE / f"{Path(path).stem}.json"
        entries = json.loads(baseline.read_text())["entries"] if baseline.exists() else {}
        if name not in entries:
            missing.append(nodeid)
    assert not missing, f"no baseline in baselines/{MACHINE}/ for: {missing}; run make update-baselines"
