"""What users read: the failure message, the summary table and the table of changed metrics."""

from pytest_kvcache.baselines import Measurement, compare
from pytest_kvcache.report import Outcome, changes_table, failure_message, summary_table

BASE = [10.0, 10.2, 10.4, 10.6, 10.8]


def outcome(test_id, ttft, evicted=(5, 5), baseline=True, updated=False):
    current = Measurement(test_id, "suite", {}, {"ttft_ms": ttft, "kv_tokens_evicted": list(evicted),
                                                 "kv_peak_bytes": [3 * 2**20, 2**20]}, 0.01)
    base = Measurement(test_id, "suite", {}, {"ttft_ms": BASE, "kv_tokens_evicted": [5, 5],
                                              "kv_peak_bytes": [3 * 2**20]}, 0.01) if baseline else None
    return Outcome(current, compare(base, current), f"suites/test_x.py::{test_id}", updated)


def test_failure_message_lists_only_regressions_and_a_runnable_command():
    """The message names each regressed metric and a shell-safe command that reruns exactly this test."""
    o = outcome("test_x[tiny-full]", [v * 2 for v in BASE], evicted=(6, 6))
    lines = failure_message(o).splitlines()
    assert lines[0] == "KV-cache benchmark regression in test_x[tiny-full]:"
    assert lines[1].startswith("  ttft_ms: baseline 10.4 ms, current 20.8 ms, change +100.0%")
    assert lines[2].startswith("  kv_tokens_evicted: baseline 5 tok, current 6 tok")
    assert "exact counter changed" in lines[2]
    assert lines[3] == "reproduce: pytest 'suites/test_x.py::test_x[tiny-full]'"
    assert lines[4] == "accept the new numbers: add --kv-update-baselines"
    assert len(lines) == 5


def test_summary_table_row_per_test_with_verdict():
    """One row per test with headline numbers; memory shown in MiB at its worst round."""
    rows = [outcome("test_a", BASE), outcome("test_b", [v * 2 for v in BASE]), outcome("test_c", BASE, baseline=False),
            outcome("test_d", BASE, updated=True)]
    lines = summary_table(rows).splitlines()
    assert lines[0].split()[0] == "test" and lines[0].split()[-1] == "verdict"
    body = {line.split()[0]: line for line in lines[2:]}
    assert body["test_a"].split()[-1] == "unchanged"
    assert body["test_b"].split()[-1] == "regressed"
    assert body["test_c"].split()[-1] == "new"
    assert body["test_d"].endswith("unchanged (baseline updated)")
    assert " 10.4 " in body["test_a"] and " 3.00 " in body["test_a"]


def test_changes_table_shows_what_moved_and_hides_the_rest():
    """Unchanged metrics and all-new tests stay out, so regressions and stale baselines stand out."""
    assert changes_table([outcome("test_a", BASE), outcome("test_c", BASE, baseline=False)]) == ""
    text = changes_table([outcome("test_a", BASE), outcome("test_fast", [v / 2 for v in BASE])])
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[2].split()[:2] == ["test_fast", "ttft_ms"]
    assert "improved" in lines[2]
