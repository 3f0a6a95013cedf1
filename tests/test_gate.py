"""The baseline gate end to end: a generated suite run through pytest, baselines recorded, edited and compared."""

import json

import pytest

from pytest_kvcache import machine
from pytest_kvcache.baselines import BaselineStore, Measurement
from pytest_kvcache.machine import machine_id
from pytest_kvcache.plugin import _param_id
from pytest_kvcache.strategies import parse_strategy

# Tiny settings: 8 requests x 2 rounds = 16 latency samples (enough for Mann-Whitney), prompt 32, output 8, all
# arriving at once. Timing noise on a shared 2-core runner is kept out of the verdicts that these tests assert:
# each prefill sleeps 25 ms, so TTFT (i x 25 ms for the i-th request) is set by the sleeps, not by CPU load; the
# other time and rate metrics get loose thresholds; and calibration is pinned (see `pinned_calibration`).
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
        hook = kv_model.model.register_forward_pre_hook(slow_prefill, with_kwargs=True)
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
    monkeypatch.setattr(machine, "calibrate", lambda device="cpu", repeats=31: 0.002)


@pytest.fixture
def suite(pytester):
    pytester.makepyfile(test_kvsuite=SUITE)
    return pytester


@pytest.fixture
def dirs(pytester):
    return pytester.path / "baselines", pytester.path / "results"


def run(pytester, dirs, *args, benchmark=False):
    baselines, results = dirs
    base = ["-p", "no:cacheprovider", "--kv-baselines", str(baselines), "--kv-results", str(results),
            "--kv-rounds", "2"]
    if not benchmark:
        base.append("--benchmark-disable")
    return pytester.runpytest(*base, *args)


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
        "machine cpu-*; baselines *; calibration * ms",
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
    assert len(full_metrics["ttft_ms"]["samples"]) == 16
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
    assert data["format"] == 1
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
    assert [p.name for p in path.parent.iterdir()] == ["test_kvsuite.json"]


def test_claimed_faster_ttft_fails_exactly_that_test(suite, dirs):
    """A baseline 3x faster on TTFT fails only its test, with a readable message, and the file stays as it was."""
    path = record(suite, dirs)
    before = edit(path, FULL, "ttft_ms", lambda s: s / 3)
    result = run(suite, dirs)
    result.assert_outcomes(passed=1, failed=1)
    assert failed_ids(result) == [FULL]
    result.stdout.fnmatch_lines([
        f"*KV-cache benchmark regression in {esc(FULL)}:",
        "  ttft_ms: baseline * ms, current * ms, change +*% (threshold 50%; Mann-Whitney p=*) -> regressed",
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
        f"(threshold 0%; exact counter changed: [[]{EVICTED}, {EVICTED}[]]) -> regressed",
    ])
    assert path.read_bytes() == before


def test_baseline_from_another_machine_is_reported(suite, dirs):
    """A mismatched fingerprint is said out loud, not silently compared."""
    path = record(suite, dirs, "-k", "full")
    data = json.loads(path.read_text())
    data["machine"]["cpu"] = "Some Other CPU"
    path.write_text(json.dumps(data))
    result = run(suite, dirs, "-k", "full")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["test_kvsuite: baseline from another machine (cpu: baseline 'Some Other CPU', *"])


def test_strict_fails_without_baseline(suite, dirs):
    """--kv-strict turns a missing baseline into a failure that says how to record one."""
    result = run(suite, dirs, "--kv-strict", "-k", "full")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*no baseline for {esc(FULL)} in *test_kvsuite.json (--kv-strict): "
                                 "record one with --kv-update-baselines*"])


def test_corrupt_baseline_is_named_and_left_alone(suite, dirs):
    """A truncated baseline fails its tests with a one-line error naming the file, and even an update keeps it."""
    path = record(suite, dirs, "-k", "full")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    before = path.read_bytes()
    result = run(suite, dirs, "-k", "full", "--kv-update-baselines")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"BaselineError: baseline {path} is corrupt (*): restore it from git *",
                                 f"FAILED test_kvsuite.py::{esc(FULL)} - BaselineError: *"])
    assert "Traceback" not in result.stdout.str()
    assert "baselines updated" not in result.stdout.str()
    assert path.read_bytes() == before


def test_benchmark_json_holds_the_timed_rounds(suite, dirs, pytester):
    """pytest-benchmark's --benchmark-json gets one entry per kv_bench test with --kv-rounds rounds."""
    out = pytester.path / "out.json"
    result = run(suite, dirs, "-k", "full", "--benchmark-json", str(out), benchmark=True)
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
    path = store.update("test_kvsuite", [m], {"machine_id": machine_id("cpu")})
    before = path.read_bytes()
    result = run(suite, dirs, "--kv-update-baselines", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["test_kvsuite.json"]
    assert not dirs[1].exists()
