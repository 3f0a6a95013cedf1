"""What users read: the failure message, the summary table, the changed metrics and the not-comparable advice."""

from pytest_kvcache.gate import gate
from pytest_kvcache.report import changes_table, failure_message, not_comparable_advice, tables
from pytest_kvcache.results import OUT_OF_MEMORY, Measurement, Outcome

BASE = [10.0, 10.1, 10.2]
MACHINE = {"cpu": "test cpu"}


def outcome(test_id, ttft, evicted=(5, 5), baseline=True, updated=False, config=None):
    current = Measurement(test_id, "suite", config or {}, {"ttft_ms": ttft, "kv_tokens_evicted": list(evicted),
                                                           "kv_peak_bytes": [3 * 2**20, 2**20]}, 0.01, MACHINE)
    base = Measurement(test_id, "suite", {}, {"ttft_ms": BASE, "kv_tokens_evicted": [5, 5],
                                              "kv_peak_bytes": [3 * 2**20]}, 0.01, MACHINE) if baseline else None
    return Outcome(f"suites/test_x.py::{test_id}", current, gate(base, current, session_sd=0.0), updated=updated)


def test_failure_message_lists_only_regressions_and_a_runnable_command():
    """The message names each regressed metric and a shell-safe command that reruns exactly this test."""
    o = outcome("test_x[tiny-full]", [v * 2 for v in BASE], evicted=(6, 6))
    lines = failure_message(o).splitlines()
    assert lines[0] == "KV-cache benchmark regression in test_x[tiny-full]:"
    assert lines[1].startswith("  ttft_ms: baseline 10.1 ms, current 20.2 ms, change +100.0%")
    assert lines[2] == ("  kv_tokens_evicted: baseline 5 tok, current 6 tok, change +20.0% (threshold 0%; exact "
                        "counter changed: 5 -> 6) -> regressed")
    assert lines[3] == "reproduce: pytest 'suites/test_x.py::test_x[tiny-full]'"
    assert lines[4] == "accept the new numbers: add --kv-update-baselines"
    assert len(lines) == 5


def test_summary_table_row_per_test_with_verdict():
    """One row per test with headline numbers; memory shown in MiB at its worst round; errors by their status."""
    oom = Outcome("suites/test_x.py::test_e", Measurement("test_e", "suite", {}, {}, None), [], error="too big",
                  error_status=OUT_OF_MEMORY)
    rows = [outcome("test_a", BASE), outcome("test_b", [v * 2 for v in BASE]), outcome("test_c", BASE, baseline=False),
            outcome("test_d", BASE, updated=True), oom]
    lines = tables(rows).splitlines()
    assert lines[0].split()[0] == "test" and lines[0].split()[-1] == "verdict"
    body = {line.split()[0]: line for line in lines[2:]}
    assert body["test_a"].split()[-1] == "unchanged"
    assert body["test_b"].split()[-1] == "regressed"
    assert body["test_c"].split()[-1] == "new"
    assert body["test_d"].endswith("unchanged (baseline updated)")
    assert body["test_e"].endswith("out of memory")
    assert " 10.1 " in body["test_a"] and " 3.00 " in body["test_a"]


def test_changes_table_shows_what_moved_and_hides_the_rest():
    """Unchanged metrics and all-new tests stay out, so regressions and stale baselines stand out."""
    assert changes_table([outcome("test_a", BASE), outcome("test_c", BASE, baseline=False)]) == ""
    lines = changes_table([outcome("test_a", BASE), outcome("test_fast", [v / 2 for v in BASE])]).splitlines()
    assert len(lines) == 3
    assert lines[2].split()[:2] == ["test_fast", "ttft_ms"]
    assert "improved" in lines[2]


def test_not_comparable_advice_says_what_to_do():
    """A configuration mismatch is reported once per test with the differing keys and the fix."""
    o = outcome("test_a", BASE, config={"rounds": 5})
    advice = not_comparable_advice(o)
    assert advice.startswith("test_a: every metric not comparable: configuration differs (rounds: None -> 5); ")
    assert "--kv-replace-baselines" in advice
    assert not_comparable_advice(outcome("test_b", BASE)) is None


def test_quality_table_puts_each_strategy_beside_its_speed():
    """A quality row shows the TPOT of a serving test of the same model and strategy from the same session."""
    config = {"model": "smollm2", "strategy": "h2o:budget=0.5"}
    serving = Outcome("suites/test_latency.py::t", Measurement("t", "test_latency", config, {"tpot_ms": [4.0, 5.0, 6.0]},
                                                               0.01, MACHINE), [])
    scored = Measurement("q", "test_quality", config, {"top1_agreement": [0.9], "kl_divergence": [0.05]}, None)
    other = Measurement("r", "test_quality", {"model": "smollm2", "strategy": "full"}, {"top1_agreement": [1.0]}, None)
    lines = tables([serving, Outcome("q", scored, []), Outcome("r", other, [])]).split("\n\n")[1].splitlines()
    assert "TPOT p50 ms" in lines[0]
    assert "passkey" not in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["q"][1:4] == ["0.900", "0.0500", "5.00"]
    assert rows["r"][1:4] == ["1.000", "-", "-"]
