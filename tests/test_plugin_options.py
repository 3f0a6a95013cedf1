"""Command-line options: listed in --help, bad values are one-line usage errors (exit 4), not tracebacks."""

import json

import pytest

from pytest_kvcache.strategies import STRATEGIES

USAGE_ERROR = pytest.ExitCode.USAGE_ERROR  # 4: pytest's exit status for argparse and pytest.UsageError


def usage_error(pytester, *args):
    """Run pytest with bad args; return its stderr lines after checking the exit status and that nothing crashed."""
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", *args)
    assert result.ret == USAGE_ERROR
    text = "\n".join(result.outlines + result.errlines)
    assert "Traceback" not in text
    assert "passed" not in text
    return result


def test_help_lists_the_kvcache_group(pytester):
    """Users discover the options through --help; every one must be there with its metavar."""
    result = pytester.runpytest("--help")
    assert result.ret == 0
    result.stdout.fnmatch_lines([
        "KV-cache benchmarks (pytest-kvcache):",
        "  --gpu *",
        "  --kv-model=NAMES *",
        "  --kv-dtype=DTYPE *",
        "  --kv-strategy=SPEC *",
        "  --kv-trace=FILE *",
        "  --kv-baselines=DIR *",
        "  --kv-update-baselines*",
        "  --kv-results=DIR *",
        "  --kv-rounds=N *",
        "  --kv-threads=N *",
        "  --kv-cpu=CPU *",
        "  --kv-session-noise=FRACTION*",
        "  --kv-strict *",
    ])
    assert "--kv-replace-baselines" in result.stdout.str()


def test_help_lists_the_markers(pytester):
    """Markers are registered, so --strict-markers suites can use them."""
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.gpu: needs a CUDA device*", "@pytest.mark.kv_strategies(*specs)*",
                                 "@pytest.mark.kv_thresholds(**metric_thresholds)*"])


@pytest.mark.parametrize("args,message", [
    (["--kv-rounds", "0"], "*error: argument --kv-rounds: expected a whole number >= 1, got 0"),
    (["--kv-rounds", "many"], "*error: argument --kv-rounds: expected a whole number >= 1, got 'many'"),
    (["--kv-model", "nosuch"], "*error: argument --kv-model: unknown model 'nosuch': choose from tiny, *or 'all'"),
    (["--kv-strategy", "streaming:budget=1.5"],
     "*error: argument --kv-strategy: budget must be a fraction in (0, 1] *, got 1.5"),
    (["--kv-strategy", "streaming:nosuchparam=1"],
     "*error: argument --kv-strategy: strategy 'streaming' has no parameter 'nosuchparam'; it takes: budget, sinks"),
    (["--kv-cpu", "999"], "*error: argument --kv-cpu: expected auto, off or one of this process's CPUs, got '999'"),
    (["--kv-session-noise", "1.5"], "*error: argument --kv-session-noise: expected a fraction in [[]0, 1), got 1.5"),
    (["--kv-dtype", "int8"], "*error: argument --kv-dtype: unknown dtype 'int8': choose fp32, bf16 or fp16"),
], ids=["rounds-0", "rounds-word", "model", "budget-range", "strategy-param", "cpu", "session-noise", "dtype"])
def test_bad_option_values_are_usage_errors(pytester, args, message):
    """A typo in an option stops the run before any model loads, with the value and what is allowed."""
    usage_error(pytester, *args).stderr.fnmatch_lines([message])


def test_unknown_strategy_names_the_known_ones(pytester):
    """The message lists the strategies the user can pick from."""
    result = usage_error(pytester, "--kv-strategy", "nosuch")
    line = [x for x in result.errlines if "--kv-strategy" in x]
    assert len(line) == 1
    assert "unknown strategy 'nosuch'" in line[0]
    for name in STRATEGIES:
        assert name in line[0]


def test_gpu_only_model_without_gpu_is_a_usage_error(pytester):
    """The 8B shape cannot run on CPU: say so instead of trying to allocate it."""
    usage_error(pytester, "--kv-model", "llama-8b").stderr.fnmatch_lines(
        ["ERROR: --kv-model llama-8b is a GPU-only shape: add --gpu on a CUDA machine"])


GOOD = {"id": "a", "arrival_s": 0.0, "prompt_ids": [5, 6, 7], "max_new_tokens": 2}


@pytest.mark.parametrize("bad_line,words", [
    ("{not json", "not valid JSON"),
    (json.dumps({"id": "b", "arrival_s": 0.0, "prompt_ids": [5]}), "missing field 'max_new_tokens'"),
    (json.dumps({**GOOD, "id": "b", "max_new_tokens": -2}), "'max_new_tokens' must be an integer >= 1, got -2"),
], ids=["bad-json", "missing-field", "negative-max-new-tokens"])
def test_malformed_kv_trace_names_file_and_line(pytester, bad_line, words):
    """--kv-trace with a bad file is a usage error pointing at the file and line."""
    path = pytester.path / "replay.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + bad_line + "\n")
    result = usage_error(pytester, "--kv-trace", str(path))
    result.stderr.fnmatch_lines([f"ERROR: --kv-trace: {path}:2: *{words}*"])


def test_missing_kv_trace_file_is_a_usage_error(pytester):
    """A mistyped path is reported, not a FileNotFoundError traceback."""
    usage_error(pytester, "--kv-trace", "nosuch.jsonl").stderr.fnmatch_lines(
        ["ERROR: --kv-trace: cannot read trace file nosuch.jsonl*"])


def test_kv_strategy_option_replaces_the_suites_list(pytester):
    """--kv-strategy (repeatable) overrides each test's kv_strategies marker, with readable test ids."""
    pytester.makepyfile(test_ids="""
        import pytest

        @pytest.mark.kv_strategies("full", "streaming:budget=0.5")
        def test_x(kv_strategy, kv_model):
            pass
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["test_ids.py::test_x[[]tiny-full[]]",
                                 "test_ids.py::test_x[[]tiny-streaming-budget0.5*[]]", "2 tests collected*"])
    result = pytester.runpytest("-p", "no:cacheprovider", "--collect-only", "-q",
                                "--kv-strategy", "streaming:budget=0.2,sinks=2", "--kv-strategy", "streaming:budget=24")
    result.stdout.fnmatch_lines(["test_ids.py::test_x[[]tiny-streaming-budget0.2*sinks2*[]]",
                                 "test_ids.py::test_x[[]tiny-streaming-budget24*[]]", "2 tests collected*"])


def test_kv_trace_replaces_the_synthetic_trace(pytester):
    """With --kv-trace every request_trace() call returns the file's requests."""
    path = pytester.path / "replay.jsonl"
    path.write_text("\n".join(json.dumps({**GOOD, "id": f"q{i}", "arrival_s": i * 0.5}) for i in range(3)) + "\n")
    pytester.makepyfile(test_replay="""
        def test_trace(request_trace, kv_model):
            trace = request_trace(model=kv_model, num_requests=50)
            assert [r.id for r in trace.requests] == ["q0", "q1", "q2"]
            assert [r.arrival_s for r in trace.requests] == [0.0, 0.5, 1.0]
    """)
    pytester.runpytest("-p", "no:cacheprovider", "--kv-trace", str(path)).assert_outcomes(passed=1)


def test_typo_in_kv_thresholds_fails_in_one_line(pytester):
    """kv_thresholds keyword names are checked: a typo fails the test with the known metric names, no traceback."""
    pytester.makepyfile(test_typo="""
        import math
        import pytest

        @pytest.mark.kv_thresholds(ttft=0.5)
        def test_y(kv_bench, kv_model, request_trace):
            trace = request_trace(model=kv_model, rate=math.inf, num_requests=2, prompt_len=8, output_len=2)
            kv_bench(trace, kv_model)
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "--benchmark-disable", "--kv-rounds", "1", "--kv-cpu", "off",
                                "--kv-baselines", "b", "--kv-results", "r")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["KVConfigError: unknown metric 'ttft': known metrics are ttft_ms, *"])
    assert "Traceback" not in result.stdout.str()


def test_bad_spec_in_kv_strategies_marker_is_a_one_line_collection_error(pytester):
    """A bad spec in a suite's marker is reported like a bad option: the test and the problem, no plugin internals."""
    pytester.makepyfile(test_marker="""
        import pytest

        @pytest.mark.kv_strategies("full", "streaming:budget=1.5")
        def test_x(kv_strategy):
            pass
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*test_x*budget must be a fraction in (0, 1]*got 1.5*"])
    text = result.stdout.str()
    assert "pluggy/_" not in text and "_pytest/python.py" not in text and "pytest_kvcache/plugin.py" not in text


def test_kv_model_all_on_cpu_means_the_models_cpu_can_run(pytester):
    """--kv-model all (offered in --help) must be usable without --gpu: the CPU models, not a usage error."""
    pytester.makepyfile(test_all="""
        def test_x(kv_model):
            pass
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "--collect-only", "-q", "--kv-model", "all")
    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines(["test_all.py::test_x[[]tiny[]]", "test_all.py::test_x[[]smollm2[]]"])


def test_kv_models_marker_per_device(pytester):
    """kv_models(cpu=..., gpu=...) picks the CPU list without --gpu; positional names stay the fallback."""
    pytester.makepyfile(test_dev="""
        import pytest

        @pytest.mark.kv_models("tiny", cpu=("smollm2",), gpu=("llama-8b",))
        def test_x(kv_model):
            pass

        @pytest.mark.kv_models(gpu=("llama-8b",))
        def test_y(kv_model):
            pass
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["test_dev.py::test_x[[]smollm2[]]", "test_dev.py::test_y[[]tiny[]]",
                                 "2 tests collected*"])


SWEEP = """
    import math
    import pytest

    @pytest.mark.sweep
    @pytest.mark.kv_strategies("full", "streaming:budget=0.5")
    def test_s(kv_bench, kv_model, kv_strategy, request_trace):
        trace = request_trace(model=kv_model, rate=math.inf, num_requests=2, prompt_len=8, output_len=2)
        kv_bench(trace, kv_model, kv_strategy)
"""


def test_sweep_is_opt_in_shows_progress_and_records_the_dtype(pytester, monkeypatch):
    """Sweep tests skip unless -m names `sweep`; a sweep prints tests done and time left; --kv-dtype bf16 loads the
    model in bf16 and the configuration records it."""
    monkeypatch.setattr("pytest_kvcache.plugin.PROGRESS_EVERY_S", 0.0)
    pytester.makepyfile(test_sweep=SWEEP)
    args = ["-p", "no:cacheprovider", "--benchmark-disable", "--kv-rounds", "1", "--kv-cpu", "off", "--kv-baselines",
            "b", "--kv-results", "r"]
    pytester.runpytest(*args).assert_outcomes(skipped=2)
    result = pytester.runpytest(*args, "-m", "sweep", "--kv-dtype", "bf16", "-rs")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["[[]kvcache sweep[]] 1/2 tests done in *, about * left",
                                 "[[]kvcache sweep[]] 2/2 tests done in *, about 0 s left"])
    outcomes = json.loads((pytester.path / "r" / "latest.json").read_text())["outcomes"]
    assert {o["entry"]["config"]["dtype"] for o in outcomes} == {"bfloat16"}
