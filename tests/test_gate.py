"""The baseline gate end to end: a generated suite run through pytest, baselines recorded, edited and compared."""

import json

import pytest

from pytest_kvcache import cli, machine
from pytest_kvcache.baselines import BaselineStore
from pytest_kvcache.machine import machine_id
from pytest_kvcache.plugin import _param_id
from pytest_kvcache.results import FORMAT, Measurement, load_results
from pytest_kvcache.strategies import parse_strategy

# Tiny settings: 8 requests x 2 rounds, prompt 32, output 8, all arriving at once. Timing noise on a shared 2-core
# runner is kept out of the verdicts that these tests assert: each prefill sleeps 25 ms, so TTFT (i x 25 ms for the
# i-th request) is set by the sleeps, not by CPU load; the other time and rate metrics get loose thresholds;
# calibration is pinned (see `pinned_calibration`), and these in-process runs do not pin the test process to a CPU.
SUITE = """
    import math
    import time

    import pytest

    LOOSE = dict(tpot_ms=3.0, itl_ms=3.0, e2e_ms=3.0, request_throughput=0.9, output_throughput=0.9, goodput=0.9)


    def slow_prefill(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            time.sleep(0.025)


    @pytest.mark.kv_thresholds(ttft_ms=0.5, **LOOSE)
    @pytest.mark.kv_strategies("full", "streaming:budget=24")
    def test_bench(kv_bench, kv_model, kv_strategy, request_trace):
        trace = request_trace(model=kv_model, rate=math.inf, num_requests=8, prompt_len=32, output_len=8, seed=1)
        hook = kv_model.model.model.register_forward_pre_hook(slow_prefill, with_kwargs=True)  # prefill runs it
        try:
            measurement = kv_bench(trace, kv_model, kv_strategy)
        finally:
            hook.remove()
        assert measurement.summary("output_tokens") == sum(r.max_new_tokens for r in trace.requests)
"""
FULL, STREAMING = (f"test_bench[tiny-{_param_id(parse_strategy(spec).label())}]"
                   for spec in ("full", "streaming:budget=24"))
EVICTED = 8 * (32 + 8 - 1 - 24)  # per round: every request stores prompt + output - 1 tokens and keeps 24


def esc(text):
    """fnmatch pattern for literal text with [brackets]."""
    return "".join("[[]" if c == "[" else "[]]" if c == "]" else c for c in text)


@pytest.fixture(autouse=True)
def pinned_calibration(monkeypatch):
    """The calibration workload is a ~70 ms snapshot that swings ~3x under a busy neighbour; pin it in these runs."""
    monkeypatch.setattr(machine, "calibrate", lambda device="cpu", repeats=5: 0.002)


@pytest.fixture
def suite(pytester):
    pytester.makepyfile(test_kvsuite=SUITE)
    return pytester


@pytest.fixture
def dirs(pytester):
    return pytester.path / "baselines", pytester.path / "results"


def run(pytester, dirs, *args, benchmark=False, subprocess=False):
    baselines, results = dirs
    base = ["-p", "no:cacheprovider", "--kv-baselines", str(baselines), "--kv-results", str(results),
            "--kv-rounds", "2", "--kv-cpu", "off"]
    if not benchmark:
        base.append("--benchmark-disable")
    return (pytester.runpytest_subprocess if subprocess else pytester.runpytest)(*base, *args)


def baseline_file(dirs):
    return dirs[0] / machine_id("cpu") / "test_kvsuite.json"


def record(pytester, dirs, *args):
    result = run(pytester, dirs, "--kv-update-baselines", *args)
    assert result.ret == 0, result.stdout.str()
    return baseline_file(dirs)


def edit(path, test_id, metric, change):
    data = json.loads(path.read_text())
    samples = data["entries"][test_id]["metrics"][metric]["samples"]
    data["entries"][test_id]["metrics"][metric]["samples"] = [change(s) for s in samples]
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path.read_bytes()


def summary_rows(result):
    """{test id: verdict} from the summary table."""
    lines = result.outlines
    start = next(i for i, line in enumerate(lines) if line.startswith("test ") and line.rstrip().endswith("verdict"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("test_bench["):
            break
        test_id, rest = line.split(" ", 1)
        rows[test_id] = rest.rsplit("  ", 1)[-1].strip()
    return rows


def failed_ids(result):
    return sorted(line.split("::", 1)[1].split(" ")[0] for line in result.outlines if line.startswith("FAILED "))


def test_first_run_is_new_passes_and_writes_results_only(suite, dirs):
    """Without a baseline a test passes as `new`; results are written, baselines are not."""
    result = run(suite, dirs)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([
        "*= KV-cache benchmark summary =*",
        "machine cpu-*; baselines *; CPUs not pinned",
        "test *TTFT p50 ms*verdict",
        f"{esc(FULL)} * new",
        f"{esc(STREAMING)} * new",
        "results written to *kvcache-*.json",
    ])
    assert summary_rows(result) == {FULL: "new", STREAMING: "new"}
    baselines, results = dirs
    assert not baselines.exists() or list(baselines.rglob("*")) == []
    stamped = sorted(results.glob("kvcache-*.json"))
    assert len(stamped) == 1
    latest = json.loads((results / "latest.json").read_text())
    assert json.loads(stamped[0].read_text()) == latest
    assert latest["machine_id"] == machine_id("cpu")
    outcomes = {o["test_id"]: o for o in latest["outcomes"]}
    assert sorted(outcomes) == [FULL, STREAMING]
    assert outcomes[FULL]["nodeid"] == f"test_kvsuite.py::{FULL}"
    assert {o["status"] for o in outcomes.values()} == {"new"}
    assert {v["status"] for v in outcomes[FULL]["verdicts"]} == {"new"}
    full_metrics = outcomes[FULL]["entry"]["metrics"]
    assert len(full_metrics["ttft_ms"]["samples"]) == 2  # one per round: a round is the sample
    assert outcomes[FULL]["thresholds"]["ttft_ms"] == 0.5
    assert outcomes[FULL]["entry"]["config"]["rounds"] == 2 and outcomes[FULL]["entry"]["config"]["workers"] == 1
    assert full_metrics["output_tokens"]["samples"] == [64, 64]
    assert full_metrics["kv_tokens_evicted"]["samples"] == [0, 0]
    assert outcomes[STREAMING]["entry"]["metrics"]["kv_tokens_evicted"]["samples"] == [EVICTED, EVICTED]
    assert parse_strategy(outcomes[STREAMING]["entry"]["config"]["strategy"]) == parse_strategy("streaming:budget=24")


def test_update_writes_baselines_and_next_run_passes(suite, dirs):
    """--kv-update-baselines records one JSON per suite keyed by test; an unchanged rerun passes and writes nothing."""
    result = run(suite, dirs, "--kv-update-baselines")
    result.assert_outcomes(passed=2)
    path = baseline_file(dirs)
    result.stdout.fnmatch_lines([f"{esc(FULL)} * new (baseline updated)", f"baselines updated: {path} (2 tests)"])
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT
    assert sorted(data["entries"]) == [FULL, STREAMING]
    assert data["machine"]["machine_id"] == machine_id("cpu")
    assert data["entries"][STREAMING]["metrics"]["kv_tokens_evicted"]["samples"] == [EVICTED, EVICTED]
    before = path.read_bytes()

    again = run(suite, dirs)
    again.assert_outcomes(passed=2)
    rows = summary_rows(again)
    assert sorted(rows) == [FULL, STREAMING]
    assert set(rows.values()) <= {"unchanged", "improved"}, rows
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")] == ["test_kvsuite.json"]


def test_a_killed_session_keeps_what_it_measured(suite, dirs):
    """A session killed after its first test (a CI time limit) leaves that test's baseline and a results file
    marked incomplete: both are written as each test finishes, not at the end."""
    suite.makepyfile(test_zkill="import os, signal\n\ndef test_killed():\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    result = run(suite, dirs, "-k", "full or killed", "--kv-update-baselines", subprocess=True)
    assert result.ret == -9, result.stdout.str()
    assert sorted(json.loads(baseline_file(dirs).read_text())["entries"]) == [FULL]
    latest = json.loads((dirs[1] / "latest.json").read_text())
    assert [o["test_id"] for o in latest["outcomes"]] == [FULL] and latest["session"]["complete"] is False
    (stamped,) = dirs[1].glob("kvcache-*.json")
    assert json.loads(stamped.read_text()) == latest


def test_claimed_faster_ttft_fails_exactly_that_test(suite, dirs):
    """A baseline 3x faster on TTFT fails only its test, with a readable message, and the file stays as it was."""
    path = record(suite, dirs)
    before = edit(path, FULL, "ttft_ms", lambda s: s / 3)
    result = run(suite, dirs)
    result.assert_outcomes(passed=1, failed=1)
    assert failed_ids(result) == [FULL]
    result.stdout.fnmatch_lines([
        f"*KV-cache benchmark regression in {esc(FULL)}:",
        "  ttft_ms: baseline * ms, current * ms, change +*% (threshold 50%; x*, *% CI [[]*, *[]], one session per "
        "side (2/2 rounds), between-session noise 15%) -> regressed",
        f"reproduce: pytest *test_kvsuite.py::{esc(FULL)}*",
        "accept the new numbers: add --kv-update-baselines",
    ])
    result.stdout.fnmatch_lines(["*metrics that changed*", f"{esc(FULL)} * ttft_ms * regressed *"])
    assert path.read_bytes() == before


def test_changed_exact_counter_fails(suite, dirs):
    """Evicted tokens are deterministic: a baseline that differs by one token fails with 'exact counter changed'."""
    path = record(suite, dirs, "-k", "streaming")
    before = edit(path, STREAMING, "kv_tokens_evicted", lambda s: s + 1)
    result = run(suite, dirs, "-k", "streaming")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        f"  kv_tokens_evicted: baseline {EVICTED + 1} tok, current {EVICTED} tok, change *"
        f"(threshold 0%; exact counter changed: {EVICTED + 1} -> {EVICTED}) -> regressed",
    ])
    assert path.read_bytes() == before


def test_baseline_from_another_machine_is_not_compared_on_time(suite, dirs):
    """A mismatched fingerprint makes the time metrics not comparable, said out loud; exact counters still gate."""
    path = record(suite, dirs, "-k", "full")
    data = json.loads(path.read_text())
    data["entries"][FULL]["machine"]["cpu"] = "Some Other CPU"
    data["entries"][FULL]["metrics"]["ttft_ms"]["samples"] = [s / 3 for s in data["entries"][FULL]["metrics"]["ttft_ms"]["samples"]]
    path.write_text(json.dumps(data))
    result = run(suite, dirs, "-k", "full")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"{esc(FULL)}: * time metrics not comparable: baseline from another machine (cpu: "
                                 "baseline 'Some Other CPU', *); record baselines on this machine type *"])
    assert summary_rows(result) == {FULL: "not comparable"}


def test_strict_fails_without_baseline(suite, dirs):
    """--kv-strict turns a missing baseline into a failure that says how to record one."""
    result = run(suite, dirs, "--kv-strict", "-k", "full")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*no baseline for {esc(FULL)} in *test_kvsuite.json (--kv-strict): "
                                 "record one with --kv-update-baselines*"])


def test_corrupt_baseline_stops_the_session_before_any_test(suite, dirs):
    """A truncated baseline is a one-line usage error (exit 4) naming the file, before any test runs; even an update
    leaves the file as it was."""
    path = record(suite, dirs, "-k", "full")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    before = path.read_bytes()
    result = run(suite, dirs, "-k", "full", "--kv-update-baselines")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: baseline {path} is corrupt (*): restore it from git or re-record it"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert "passed" not in result.stdout.str()
    assert path.read_bytes() == before


def edit_entry(path, test_id, change):
    data = json.loads(path.read_text())
    change(data["entries"][test_id])
    path.write_text(json.dumps(data))
    return path.read_bytes()


def set_samples(metric, value):
    def change(entry):
        entry["metrics"][metric]["samples"] = value
    return change


@pytest.mark.parametrize("change,message", [
    (set_samples("ttft_ms", []), "metric 'ttft_ms' needs a non-empty 'samples' list"),
    (set_samples("ttft_ms", ["fast", 1.0]), "metric 'ttft_ms' has samples that are not finite numbers: 'fast'"),
    (lambda e: e.update(calibration_s=0), "calibration_s must be a number > 0 seconds, got 0"),
], ids=["empty-samples", "string-samples", "calibration-0"])
def test_unusable_entry_stops_the_session_and_an_update_replaces_it(suite, dirs, change, message):
    """An entry that cannot be used is exit 4 before any test runs, with how to fix it; --kv-update-baselines
    replaces exactly that entry when its test passes."""
    path = record(suite, dirs)
    before = edit_entry(path, FULL, change)
    result = run(suite, dirs)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: baseline {path} entry '{esc(FULL)}': {message}; or rerun with "
                                 "--kv-update-baselines to replace unreadable entries"])
    assert path.read_bytes() == before
    fixed = run(suite, dirs, "--kv-update-baselines")
    fixed.assert_outcomes(passed=2)
    fixed.stdout.fnmatch_lines([f"replaced unreadable baseline {esc(FULL)} in {path}"])
    assert BaselineStore(dirs[0], machine_id("cpu")).problems(["test_kvsuite"]) == []


def test_nan_in_a_baseline_stops_the_session(suite, dirs):
    """NaN used to switch the gate off silently."""
    path = record(suite, dirs, "-k", "full")
    before = edit_entry(path, FULL, set_samples("output_tokens", [float("nan"), 64]))
    result = run(suite, dirs, "-k", "full")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: baseline {path} holds NaN or infinity at entries.*, which is not a number*"])
    assert path.read_bytes() == before


def test_calibration_far_from_the_baselines_makes_time_not_comparable(suite, dirs):
    """A baseline calibration of 1e-5 s used to make every test pass; now time metrics are not comparable."""
    path = record(suite, dirs, "-k", "full")
    edit_entry(path, FULL, lambda e: e.update(calibration_s=1e-5))
    edit_entry(path, FULL, set_samples("ttft_ms", [1e-3, 1e-3]))
    result = run(suite, dirs, "-k", "full")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"{esc(FULL)}: * time metrics not comparable: calibration ratio x0.005 *outside "
                                 "[[]0.5, 2[]]; the machine's speed changed too much*"])


def test_another_configuration_is_not_compared_nor_overwritten(suite, dirs):
    """--kv-rounds 3 against 2-round baselines: not comparable (passes, says so); an update refuses to overwrite
    them and says how; --kv-replace-baselines replaces them."""
    path = record(suite, dirs, "-k", "full")
    before = path.read_bytes()
    result = run(suite, dirs, "-k", "full", "--kv-rounds", "3")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"{esc(FULL)}: every metric not comparable: configuration differs (rounds: 2 -> 3); "
                                 "record a baseline for this configuration with --kv-replace-baselines*"])
    updated = run(suite, dirs, "-k", "full", "--kv-rounds", "3", "--kv-update-baselines")
    updated.stdout.fnmatch_lines([f"baseline {esc(FULL)} in {path} NOT updated: it was recorded with another "
                                  "configuration (rounds: 2 -> 3); run with the suite's default options, or add "
                                  "--kv-replace-baselines to replace it"])
    assert path.read_bytes() == before
    run(suite, dirs, "-k", "full", "--kv-rounds", "3", "--kv-replace-baselines").assert_outcomes(passed=1)
    assert json.loads(path.read_text())["entries"][FULL]["config"]["rounds"] == 3


def test_kvbench_diff_agrees_with_the_pytest_gate(suite, dirs, capsys):
    """The same numbers give the same verdicts: pytest's (stored in the results file) and `kvbench diff`'s."""
    path = record(suite, dirs)
    edit(path, FULL, "ttft_ms", lambda s: s / 3)
    result = run(suite, dirs)
    assert failed_ids(result) == [FULL]
    stored = load_results(dirs[1])
    pytest_verdicts = {(o.measurement.test_id, v.metric): v.status for o in stored.outcomes for v in o.verdicts}
    assert cli.main(["diff", str(dirs[0]), "--results", str(dirs[1]), "--format", "plain"]) == 1
    out = capsys.readouterr().out
    assert "1 regressed, 1 not regressed" in out
    from pytest_kvcache.gate import gate

    baselines = BaselineStore(dirs[0], machine_id("cpu"))
    diff_verdicts = {(o.measurement.test_id, v.metric): v.status for o in stored.outcomes
                     for v in gate(baselines.get("test_kvsuite", o.measurement.test_id), o.measurement,
                                   o.thresholds, stored.session["session_sd"])}
    assert diff_verdicts == pytest_verdicts
    assert pytest_verdicts[(FULL, "ttft_ms")] == "regressed"
    regressed_rows = {tuple(line.split()[:2]) for line in out.splitlines() if line.startswith("test_") and "regressed" in line}
    assert (FULL, "ttft_ms") in regressed_rows and not any(STREAMING in row for row in regressed_rows)


def test_benchmark_json_holds_the_timed_rounds(suite, dirs, pytester, monkeypatch):
    """pytest-benchmark's --benchmark-json gets one entry per kv_bench test with --kv-rounds rounds."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)  # under an outer -n, pytest-benchmark would leave the file to a controller
    out = pytester.path / "out.json"
    result = run(suite, dirs, "-k", "full", "--benchmark-json", str(out), benchmark=True, subprocess=True)
    result.assert_outcomes(passed=1)
    benchmarks = json.loads(out.read_text())["benchmarks"]
    assert [b["name"] for b in benchmarks] == [FULL]
    assert benchmarks[0]["group"] == "test_kvsuite"
    assert benchmarks[0]["stats"]["rounds"] == 2
    assert len(benchmarks[0]["stats"]["data"]) == 2
    assert benchmarks[0]["extra_info"]["output_tokens"] == 64


BAD_TRACE = '{"id": "a", "arrival_s": 0.0, "prompt_ids": [5], "max_new_tokens": -1}\n'


@pytest.mark.parametrize("args", [
    ["--kv-strategy", "nosuch"],
    ["--kv-strategy", "streaming:budget=1.5"],
    ["--kv-trace", "bad.jsonl"],
], ids=["unknown-strategy", "budget-1.5", "malformed-trace"])
def test_bad_input_with_update_leaves_baselines_byte_identical(suite, dirs, args):
    """A usage error under --kv-update-baselines must not touch the stored baselines."""
    (suite.path / "bad.jsonl").write_text(BAD_TRACE)
    store = BaselineStore(dirs[0], machine_id("cpu"))
    m = Measurement(FULL, "test_kvsuite", {}, {"ttft_ms": [1.0, 2.0], "kv_tokens_evicted": [0, 0]}, 0.01)
    path = store.update("test_kvsuite", [m], {"machine_id": machine_id("cpu")}).path
    before = path.read_bytes()
    result = run(suite, dirs, "--kv-update-baselines", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")] == ["test_kvsuite.json"]
    assert not dirs[1].exists()


@pytest.mark.parametrize("fixture", ["kv_bench", "kv_quality", "kv_retrieval"])
def test_every_kv_fixture_has_its_baselines_checked_before_any_test(pytester, dirs, fixture):
    """A suite measured by any kv fixture gets its baselines validated at collection: an older-format file stops the
    session (exit 4) before the test body runs, and the file is left as it was."""
    pytester.makepyfile(test_kvsuite=f"""
        def test_x({fixture}):
            raise AssertionError("the session should have stopped before this test")
    """)
    path = baseline_file(dirs)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": 1, "entries": {}}))
    before = path.read_bytes()
    result = run(pytester, dirs)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*is a format-1 baselines file*"])
    assert path.read_bytes() == before
