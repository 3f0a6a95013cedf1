"""pytest hooks: options, markers, GPU gating, parametrization over models/strategies, the gate and the summary.

Importing this module (a pytest11 entry point, loaded by every pytest session) imports neither torch,
transformers nor scipy: they load when a kv fixture first runs, or when an option that needs them is given.

Exit status: pytest's own. A regression fails its test (exit 1); a missing baseline is reported as `new` and
passes unless --kv-strict; bad options and unusable baselines are usage errors (exit 4) before any test runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pytest_kvcache.baselines import BaselineStore
from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.metrics import metric
from pytest_kvcache.models import MODELS, get_spec
from pytest_kvcache.report import failure_message, not_comparable_advice, summary_text
from pytest_kvcache.results import (
    FormatError,
    Measurement,
    OlderFormat,
    Outcome,
    Results,
    outcome_from_json,
    write_json_atomic,
)
from pytest_kvcache.traces import TraceError, load_jsonl

KV_FIXTURES = ("kv_bench", "kv_quality", "kv_retrieval")
MARKERS = {
    "gpu": "gpu: needs a CUDA device; runs only with --gpu",
    "quality": "quality: measures output quality on real weights (slow on CPU)",
    "sweep": "sweep: part of the characterization sweep (many configurations)",
    "smoke": "smoke: the fast selection `kvbench compare` runs on pull requests",
    "kv_smoke": "kv_smoke(*specs): which of the test's kv_strategies belong to the smoke selection (marked smoke)",
    "kv_models": "kv_models(*names, cpu=(...), gpu=(...)): models to parametrize kv_model with when --kv-model is "
                 "not given (cpu/gpu: per device, without or with --gpu)",
    "kv_strategies": "kv_strategies(*specs): strategies to parametrize kv_strategy with, e.g. 'streaming:budget=0.5'",
    "kv_thresholds": "kv_thresholds(**metric_thresholds): regression thresholds per module/class/test (closest wins), e.g. ttft_ms=0.5",
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {value}")
    return value


def _cpu(text: str) -> str | int:
    if text in ("auto", "off"):
        return text
    if text.isdigit() and int(text) in (os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else {0}):
        return int(text)
    raise argparse.ArgumentTypeError(f"expected auto, off or one of this process's CPUs, got {text!r}")


def _model_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return ["all"]
    for name in names:
        if name not in MODELS:
            raise argparse.ArgumentTypeError(f"unknown model {name!r}: choose from {', '.join(MODELS)} or 'all'")
    if not names:
        raise argparse.ArgumentTypeError("expected at least one model name")
    return names


DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
          "float16": "float16"}


def _dtype(text: str) -> str:
    if text.lower() not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}: choose fp32, bf16 or fp16")
    return DTYPES[text.lower()]


def _strategy(text: str) -> str:
    from pytest_kvcache.strategies import parse_strategy

    try:
        return parse_strategy(text).label()
    except KVConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvcache", "KV-cache benchmarks (pytest-kvcache)")
    group.addoption("--gpu", action="store_true", default=False,
                    help="run GPU-marked tests and put models on CUDA; usage error if no CUDA device is visible "
                         "(default: off, CPU only)")
    group.addoption("--kv-model", metavar="NAMES", type=_model_names, default=None,
                    help=f"comma-separated models for tests using kv_model: {', '.join(MODELS)}, or 'all' (those the device runs) "
                         "(default: each test's kv_models marker, else tiny; with --gpu tiny,llama-1b)")
    group.addoption("--kv-dtype", metavar="DTYPE", type=_dtype, default=None,
                    help="model dtype: fp32, bf16 or fp16, recorded in each measurement's configuration (a baseline "
                         "of another dtype is not comparable) (default: fp32 on CPU, bf16 on GPU)")
    group.addoption("--kv-strategy", metavar="SPEC", type=_strategy, action="append", default=None,
                    help="run suites with these strategies instead of their own list, e.g. "
                         "'streaming:budget=0.2,sinks=4'; repeatable (default: each suite's list)")
    group.addoption("--kv-trace", metavar="FILE", default=None,
                    help="replay this JSONL trace instead of the suites' synthetic traces (default: synthetic)")
    group.addoption("--kv-baselines", metavar="DIR", default=None,
                    help="baseline folder; files are DIR/<machine>/<suite>.json (default: <rootdir>/baselines)")
    group.addoption("--kv-update-baselines", action="store_true", default=False,
                    help="accept this run's numbers as the new baselines for the tests that passed (entries of "
                         "the same configuration, new ones and unreadable ones), written as each test passes, so an "
                         "interrupted session keeps what it measured (default: off, baselines are read-only)")
    group.addoption("--kv-replace-baselines", action="store_true", default=False,
                    help="like --kv-update-baselines, and also replace entries recorded with another "
                         "configuration (default: off)")
    group.addoption("--kv-results", metavar="DIR", default=None,
                    help="write every measurement and verdict of this run as JSON here, rewritten after each test "
                         "(default: <rootdir>/results)")
    group.addoption("--kv-rounds", metavar="N", type=_positive_int, default=3,
                    help="timed replays of each trace after one warm-up (default: 3)")
    group.addoption("--kv-threads", metavar="N", type=_positive_int, default=None,
                    help="torch intra-op threads for CPU runs, set when a kv fixture first runs; one thread keeps "
                         "the tiny model's timings steady on small shared machines (default: 1 on CPU, torch's own "
                         "on GPU)")
    group.addoption("--kv-cpu", metavar="CPU", type=_cpu, default="auto",
                    help="pin the benchmark process to one CPU when a kv fixture first runs: auto (the idlest, "
                         "moving away from busy neighbours between rounds; CPU runs only), off, or a CPU number "
                         "(default: auto)")
    group.addoption("--kv-session-noise", metavar="FRACTION", type=_fraction, default=None,
                    help="between-session noise of time metrics that the stored-baseline gate assumes, as a "
                         "log-scale SD; lower it on a dedicated runner (default: 0.15, measured on a shared 2-core "
                         "machine by benchmarks/gate_experiments.py)")
    group.addoption("--kv-strict", action="store_true", default=False,
                    help="fail tests that have no stored baseline instead of reporting them as new (default: off)")


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _workers(config: pytest.Config) -> int:
    """How many processes measure at once: the xdist worker count, 1 without xdist."""
    if _is_worker(config):
        return int(config.workerinput.get("workercount", 1))
    n = getattr(config.option, "numprocesses", None)
    return n if isinstance(n, int) and n > 0 else 1


@dataclass
class KVSession:
    """State shared by every test of one pytest session (kept in config.stash)."""

    config: pytest.Config
    device: str
    store: BaselineStore
    results_dir: Path
    session_sd: float
    models: dict = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    passed: set[str] = field(default_factory=set)
    fingerprint: dict | None = None
    warnings: list[str] = field(default_factory=list)
    trace_override: object | None = None
    pin: object | None = None
    started: bool = False
    unreadable: dict[tuple[str, str], str] = field(default_factory=dict)
    older_files: list[str] = field(default_factory=list)
    results_path: Path | None = None
    progress: Progress | None = None
    saved: int = 0
    baselined: int = 0
    baselines_written: dict[Path, int] = field(default_factory=dict)
    cpus_allowed: list[int] = field(default_factory=lambda: sorted(os.sched_getaffinity(0))
                                    if hasattr(os, "sched_getaffinity") else [])

    @property
    def updating(self) -> bool:
        return self.config.getoption("kv_update_baselines") or self.config.getoption("kv_replace_baselines")

    @property
    def workers(self) -> int:
        return _workers(self.config)

    @property
    def shared_cores(self) -> bool:
        """xdist workers that contend for the CPUs: their timings are not baselines."""
        return self.workers > 1 and self.workers >= (len(self.cpus_allowed) or os.cpu_count() or 1)

    def start(self) -> None:
        """First kv fixture: torch threads, never at import or for sessions without kv tests."""
        if self.started:
            return
        self.started = True
        import torch

        threads = self.config.getoption("kv_threads")
        if self.device == "cpu" or threads:
            torch.set_num_threads(threads or 1)

    def pin_cpu(self) -> None:
        """First timed benchmark: pin this process to one CPU as --kv-cpu says (once per session)."""
        if self.pin is not None:
            return
        choice = self.config.getoption("kv_cpu")
        if choice == "off" or (choice == "auto" and self.device != "cpu"):
            return
        from pytest_kvcache.machine import CpuPin

        allowed = self.cpus_allowed
        if isinstance(choice, int):
            self.pin = CpuPin(allowed, fixed=True)
            self.pin.pin(choice)
        elif self.workers > 1:
            index = int(self.config.workerinput["workerid"].lstrip("gw")) if _is_worker(self.config) else 0
            self.pin = CpuPin(allowed, fixed=True)
            self.pin.pin(allowed[index % len(allowed)] if allowed else None)
        else:
            self.pin = CpuPin(allowed)
            self.pin.pin()

    def machine(self) -> dict:
        if self.fingerprint is None:
            from pytest_kvcache.machine import fingerprint

            self.fingerprint = fingerprint(self.device)
        return self.fingerprint

    def thresholds(self, item: pytest.Item) -> dict[str, float]:
        """Per-test thresholds from kv_thresholds markers (closest wins); unknown metric names are errors."""
        thresholds: dict[str, float] = {}
        for marker in reversed(list(item.iter_markers("kv_thresholds"))):
            for name, value in marker.kwargs.items():
                metric(name)
                thresholds[name] = float(value)
        return thresholds

    def record(self, item: pytest.Item, measurement: Measurement) -> Outcome:
        """Gate a measurement on its stored baseline; fails the test on a regression unless updating."""
        from pytest_kvcache.gate import gate

        thresholds = self.thresholds(item)
        key = (measurement.suite, measurement.test_id)
        readable = key not in self.unreadable and measurement.suite not in self.older_files
        baseline = self.store.get(*key) if readable else None
        verdicts = gate(baseline, measurement, thresholds, self.session_sd)
        outcome = Outcome(item.nodeid, measurement, verdicts, thresholds, updated=self.updating)
        self.outcomes.append(outcome)
        advice = not_comparable_advice(outcome)
        if advice and advice not in self.warnings:
            self.warnings.append(advice)
        if self.updating:
            return outcome
        if baseline is None and self.config.getoption("kv_strict"):
            pytest.fail(f"no baseline for {measurement.test_id} in {self.store.path(measurement.suite)} "
                        "(--kv-strict): record one with --kv-update-baselines", pytrace=False)
        if any(v.fails for v in verdicts):
            pytest.fail(failure_message(outcome), pytrace=False)
        return outcome

    def record_error(self, item: pytest.Item, measurement: Measurement, message: str, status: str) -> None:
        """A configuration that produced an error as its result (e.g. out of memory): kept in the results."""
        self.outcomes.append(Outcome(item.nodeid, measurement, [], self.thresholds(item), error=message,
                                     error_status=status))


SESSION = pytest.StashKey[KVSession]()


def kv_session(config: pytest.Config) -> KVSession:
    return config.stash[SESSION]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` with --gpu: one worker per visible GPU (NVML counts them without initialising CUDA)."""
    if not config.getoption("gpu"):
        return None
    from pytest_kvcache.devices import visible_gpus

    return max(1, len(visible_gpus()))


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS.values():
        config.addinivalue_line("markers", line)
    device = "cpu"
    if config.getoption("gpu"):
        if _is_worker(config):
            from pytest_kvcache.devices import pin_worker

            try:  # before anything initialises CUDA: this worker's cuda:0 is its own GPU
                pin_worker(config.workerinput["workerid"])
            except KVConfigError as e:
                raise pytest.UsageError(str(e)) from None
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("--gpu was given but no CUDA device is visible (torch.cuda.is_available() is "
                                    "False): drop --gpu, or run on a GPU machine with a CUDA build of torch")
        device = "cuda"
    if config.getoption("kv_model") == ["all"]:
        config.option.kv_model = [n for n, spec in MODELS.items() if device == "cuda" or not spec.gpu_only]
    for name in config.getoption("kv_model") or []:
        if get_spec(name).gpu_only and device != "cuda":
            raise pytest.UsageError(f"--kv-model {name} is a GPU-only shape: add --gpu on a CUDA machine")
    root = Path(config.rootpath)
    baselines = Path(config.getoption("kv_baselines") or root / "baselines")
    results = Path(config.getoption("kv_results") or root / "results")
    from pytest_kvcache.gate import SESSION_SD
    from pytest_kvcache.machine import machine_id

    noise = config.getoption("kv_session_noise")
    session = KVSession(config, device, BaselineStore(baselines, machine_id(device)), results,
                        SESSION_SD if noise is None else noise)
    trace_path = config.getoption("kv_trace")
    if trace_path:
        try:
            session.trace_override = load_jsonl(trace_path)
        except TraceError as e:
            raise pytest.UsageError(f"--kv-trace: {e}") from None
    config.stash[SESSION] = session


def _param_id(spec: str) -> str:
    return spec.replace(":", "-").replace(",", "-").replace("=", "")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize kv_model from --kv-model and kv_strategy from the kv_strategies marker or --kv-strategy;
    a bad name in a marker is a one-line collection error naming the test."""
    try:
        _parametrize(metafunc)
        return
    except KVConfigError as e:
        message = f"{metafunc.definition.nodeid}: {e}"
    pytest.fail(message, pytrace=False)


def _parametrize(metafunc: pytest.Metafunc) -> None:
    config = metafunc.config
    if "kv_model" in metafunc.fixturenames and not _directly_parametrized(metafunc, "kv_model"):
        marker = metafunc.definition.get_closest_marker("kv_models")
        gpu = config.getoption("gpu")
        default = ["tiny", "llama-1b"] if gpu else ["tiny"]
        if marker is not None:  # kv_models("tiny", ...) or per device: kv_models(cpu=(...), gpu=(...))
            default = list(marker.kwargs.get("gpu" if gpu else "cpu", marker.args)) or default
        names = config.getoption("kv_model") or default
        for name in names:
            get_spec(name)
        metafunc.parametrize("kv_model", names, indirect=True, ids=names)
    if "kv_strategy" in metafunc.fixturenames and not _directly_parametrized(metafunc, "kv_strategy"):
        from pytest_kvcache.strategies import parse_strategy

        override = config.getoption("kv_strategy")
        marker = metafunc.definition.get_closest_marker("kv_strategies")
        specs = override or (list(marker.args) if marker else ["full"])
        labels = [parse_strategy(s).label() for s in specs]
        smoke_marker = metafunc.definition.get_closest_marker("kv_smoke")
        smoke = {parse_strategy(s).label() for s in smoke_marker.args} if smoke_marker else set()
        params = [pytest.param(label, marks=[pytest.mark.smoke] if label in smoke else [], id=_param_id(label))
                  for label in labels]
        metafunc.parametrize("kv_strategy", params, indirect=True)


def _directly_parametrized(metafunc: pytest.Metafunc, name: str) -> bool:
    return any(name in m.args[0] for m in metafunc.definition.iter_markers("parametrize") if m.args)


def _sweep_selected(config: pytest.Config) -> bool:
    """The characterization sweep is opt-in: it runs when -m names `sweep`."""
    return "sweep" in (config.getoption("markexpr") or "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests need --gpu; sweep tests need -m sweep."""
    gpu = config.getoption("gpu")
    sweep = _sweep_selected(config)
    skip_gpu = pytest.mark.skip(reason="GPU test: run with --gpu on a CUDA machine")
    skip_sweep = pytest.mark.skip(reason="characterization sweep: run it with -m sweep (make characterize)")
    for item in items:
        if not gpu and item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)
        if not sweep and item.get_closest_marker("sweep") is not None:
            item.add_marker(skip_sweep)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Check the baselines of the suites about to run before any test does: one line, exit 4, nothing written.
    With --kv-update-baselines unreadable entries are noted and replaced by their tests' new numbers."""
    kv = kv_session(session.config)
    if session.config.option.collectonly:
        return
    if (_sweep_selected(session.config) and not _is_worker(session.config)
            and any(item.get_closest_marker("sweep") is not None for item in session.items)):
        kv.progress = Progress(len(session.items))
    suites = sorted({Path(str(item.path)).stem for item in session.items
                     if any(f in getattr(item, "fixturenames", ()) for f in KV_FIXTURES)})
    problems = kv.store.problems(suites)
    if not problems:
        return
    fatal = []
    for suite in suites:
        try:
            for test_id, reason in kv.store.unreadable(suite).items():
                kv.unreadable[(suite, test_id)] = reason
        except OlderFormat as e:
            if not kv.updating:
                fatal.append(str(e))
            kv.older_files.append(suite)
        except FormatError as e:
            fatal.append(str(e))
    if not fatal and kv.updating and not kv.unreadable:
        return
    if fatal or not kv.updating:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        first = (fatal or problems)[0]
        fix = "" if fatal else "; or rerun with --kv-update-baselines to replace unreadable entries"
        raise pytest.UsageError(f"{first}{more}{fix}")
    kv.warnings += [f"unreadable baseline replaced if its test passes: {reason}" for reason in kv.unreadable.values()]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call" and report.passed and SESSION in item.config.stash:
        kv_session(item.config).passed.add(item.nodeid)
    if call.excinfo is not None and isinstance(call.excinfo.value, KVConfigError):
        report.longrepr = f"{type(call.excinfo.value).__name__}: {call.excinfo.value}"
    return report


def pytest_testnodedown(node, error) -> None:
    """xdist controller: collect the measurements a worker made."""
    payload = getattr(node, "workeroutput", {}).get("kvcache")
    if not payload:
        return
    session = kv_session(node.config)
    data = json.loads(payload)
    session.fingerprint = session.fingerprint or data["machine"]
    for i, o in enumerate(data["outcomes"]):
        session.outcomes.append(outcome_from_json(o, data["machine"], f"xdist worker outcome {i}"))
    session.passed.update(data["passed"])
    session.warnings += [w for w in data["warnings"] if w not in session.warnings]
    session.baselined = len(session.outcomes)  # the worker wrote their baselines as its tests passed
    for path, n in data.get("baselines_written", {}).items():
        session.baselines_written[Path(path)] = session.baselines_written.get(Path(path), 0) + n


def _session_facts(kv: KVSession) -> dict:
    """What the results file says about how this session measured."""
    return {
        "device": kv.device,
        "workers": kv.workers,
        "shared_cores": kv.shared_cores,
        "session_sd": kv.session_sd,
        "rounds": kv.config.getoption("kv_rounds"),
        "cpu_option": str(kv.config.getoption("kv_cpu")),
        "cpus_allowed": kv.cpus_allowed,
    }


@dataclass
class Progress:
    """Tests done and time left, printed during a sweep (a line every PROGRESS_EVERY_S seconds)."""

    total: int
    start: float = field(default_factory=time.monotonic)
    done: int = 0
    printed: float = field(default_factory=time.monotonic)

    def step(self) -> str | None:
        self.done += 1
        now = time.monotonic()
        if now - self.printed < PROGRESS_EVERY_S and self.done < self.total:
            return None
        self.printed = now
        elapsed = now - self.start
        left = elapsed / self.done * (self.total - self.done)
        return (f"[kvcache sweep] {self.done}/{self.total} tests done in {_duration(elapsed)}, "
                f"about {_duration(left)} left")


PROGRESS_EVERY_S = 30.0


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """After each test: its baseline (when updating) and the session's results file so far, so a session that is
    interrupted (a CI time limit, a kill) keeps every measurement it made."""
    result = yield
    config = item.config
    if SESSION not in config.stash:
        return result
    kv = kv_session(config)
    if kv.updating:
        _update_baselines(kv)
    if not _is_worker(config) and len(kv.outcomes) > kv.saved:
        _write_results(kv, complete=False)
    line = kv.progress.step() if kv.progress is not None else None
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if line and reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(line)
    return result


def _write_results(kv: KVSession, complete: bool) -> None:
    """The session's results file (one path per session, rewritten atomically as tests finish) and latest.json."""
    stamp = datetime.now(timezone.utc)
    if kv.results_path is None:
        kv.results_path = _unused_path(kv.results_dir, f"kvcache-{stamp:%Y%m%d-%H%M%S}")
    facts = {**_session_facts(kv), "complete": complete}
    data = Results(stamp.isoformat(timespec="seconds"), kv.machine(), kv.store.machine_id, facts, kv.outcomes).to_json()
    write_json_atomic(kv.results_path, data)
    write_json_atomic(kv.results_dir / "latest.json", data)
    kv.saved = len(kv.outcomes)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if "pytest_kvcache.engines.vllm" in sys.modules:
        sys.modules["pytest_kvcache.engines.vllm"].shutdown_all()
    config = session.config
    if SESSION not in config.stash:
        return
    kv = kv_session(config)
    if kv.updating:
        _update_baselines(kv)
    if _is_worker(config):
        if kv.outcomes:
            config.workeroutput["kvcache"] = json.dumps({
                "machine": kv.machine(),
                "outcomes": [o.to_json() for o in kv.outcomes],
                "passed": sorted(kv.passed),
                "warnings": kv.warnings,
                "baselines_written": {str(path): n for path, n in kv.baselines_written.items()},
            })
        return
    if not kv.outcomes:
        return
    if kv.updating:
        _baseline_summary(kv)
    _write_results(kv, complete=True)
    kv.warnings.insert(0, f"results written to {kv.results_path}")


def _unused_path(folder: Path, stem: str) -> Path:
    """results/<stem>.json, or <stem>-2.json, ... so sessions in the same second keep their own file."""
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    return path


def _without_timing(m: Measurement) -> Measurement:
    metrics = {n: v for n, v in m.metrics.items() if not metric(n).machine_dependent}
    return Measurement(m.test_id, m.suite, m.config, metrics, None, m.machine, m.info)


def _update_baselines(kv: KVSession) -> None:
    """Write the passed tests among the outcomes since the last update into their suites' baseline files (under
    the store's lock)."""
    outcomes, kv.baselined = kv.outcomes[kv.baselined :], len(kv.outcomes)
    by_suite: dict[str, list[Measurement]] = {}
    for o in outcomes:
        if o.nodeid in kv.passed and o.error is None:
            m = _without_timing(o.measurement) if kv.shared_cores else o.measurement
            by_suite.setdefault(m.suite, []).append(m)
    replace = kv.config.getoption("kv_replace_baselines")
    for suite, measurements in sorted(by_suite.items()):
        try:
            report = kv.store.update(suite, measurements, kv.machine(), replace=replace)
        except FormatError as e:
            if f"baselines NOT updated: {e}" not in kv.warnings:
                kv.warnings.append(f"baselines NOT updated: {e}")
            continue
        kv.baselines_written[report.path] = kv.baselines_written.get(report.path, 0) + len(report.written)
        for test_id in report.replaced_unreadable:
            kv.warnings.append(f"replaced unreadable baseline {test_id} in {report.path}")
        if report.older_format:
            kv.warnings.append(f"{report.path} was written in an older format: it now holds this run's tests only")
        for test_id, diff in report.refused.items():
            kv.warnings.append(f"baseline {test_id} in {report.path} NOT updated: it was recorded with another "
                               f"configuration ({diff}); run with the suite's default options, or add "
                               "--kv-replace-baselines to replace it")


def _baseline_summary(kv: KVSession) -> None:
    """The session's lines about what the updates wrote and which timings they did not take."""
    recorded = [o.measurement for o in kv.outcomes if o.nodeid in kv.passed and o.error is None]
    disturbed = [m.test_id for m in recorded if m.info.get("still_disturbed")]
    if disturbed:
        kv.warnings.append(f"{len(disturbed)} tests were recorded with rounds that other processes kept waiting for "
                           f"the CPU ({', '.join(disturbed[:3])}{', ...' if len(disturbed) > 3 else ''}): their time "
                           "metrics stay 'not comparable' until recorded again on a quieter machine")
    if kv.shared_cores and recorded:
        kv.warnings.append(f"{kv.workers} xdist workers share {len(kv.cpus_allowed)} CPUs: their timings "
                           "contend, so time and rate metrics were NOT recorded as baselines; record those without -n")
    for path, written in sorted(kv.baselines_written.items()):
        if written:
            kv.warnings.append(f"baselines updated: {path} ({written} tests)")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if SESSION not in config.stash or _is_worker(config):
        return
    kv = kv_session(config)
    if not kv.outcomes:
        return
    tr = terminalreporter
    tr.write_sep("=", "KV-cache benchmark summary")
    pins = sorted({c for o in kv.outcomes for c in o.measurement.info.get("cpus", []) if c is not None})
    tr.write_line(f"machine {kv.store.machine_id}; baselines {kv.store.root}; CPUs {pins or 'not pinned'}"
                  + ("; xdist workers share the CPUs: timings contend" if kv.shared_cores else ""))
    table, changes = summary_text(sorted(kv.outcomes, key=lambda o: o.nodeid))
    tr.write_line(table)
    if changes:
        tr.write_sep("-", "metrics that changed (improved: refresh the baseline with --kv-update-baselines)")
        tr.write_line(changes)
    for line in kv.warnings:
        tr.write_line(line)

