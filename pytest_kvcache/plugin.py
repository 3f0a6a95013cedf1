"""pytest hooks: options, markers, GPU gating, parametrization over models/strategies, the gate and the summary.

Exit status: pytest's own. A regression fails its test (exit 1); a missing baseline is reported as `new` and
passes unless --kv-strict; bad options are usage errors (exit 4).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pytest_kvcache.baselines import (
    BaselineError,
    BaselineStore,
    Measurement,
    compare,
    rule_for,
    verdicts_to_json,
    write_json_atomic,
)
from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.models import MODELS, get_spec
from pytest_kvcache.report import Outcome, changes_table, failure_message, tables
from pytest_kvcache.strategies import parse_strategy
from pytest_kvcache.traces import TraceError, load_jsonl

RESULTS_FORMAT = 1
MARKERS = {
    "gpu": "gpu: needs a CUDA device; runs only with --gpu",
    "quality": "quality: measures output quality on real weights (slow on CPU)",
    "sweep": "sweep: part of the characterization sweep (many configurations)",
    "kv_models": "kv_models(*names): models to parametrize kv_model with when --kv-model is not given",
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


def _strategy(text: str) -> str:
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
    group.addoption("--kv-strategy", metavar="SPEC", type=_strategy, action="append", default=None,
                    help="run suites with these strategies instead of their own list, e.g. "
                         "'streaming:budget=0.2,sinks=4'; repeatable (default: each suite's list)")
    group.addoption("--kv-trace", metavar="FILE", default=None,
                    help="replay this JSONL trace instead of the suites' synthetic traces (default: synthetic)")
    group.addoption("--kv-baselines", metavar="DIR", default=None,
                    help="baseline folder; files are DIR/<machine>/<suite>.json (default: <rootdir>/baselines)")
    group.addoption("--kv-update-baselines", action="store_true", default=False,
                    help="accept this run's numbers as the new baselines for the tests that passed; written "
                         "atomically at the end of the session (default: off, baselines are read-only)")
    group.addoption("--kv-results", metavar="DIR", default=None,
                    help="write every measurement and verdict of this run as JSON here (default: <rootdir>/results)")
    group.addoption("--kv-rounds", metavar="N", type=_positive_int, default=3,
                    help="timed replays of each trace after one warm-up (default: 3)")
    group.addoption("--kv-threads", metavar="N", type=_positive_int, default=None,
                    help="torch intra-op threads for CPU runs; one thread keeps the tiny model's timings steady on "
                         "small shared machines (default: 1 on CPU, torch's own on GPU)")
    group.addoption("--kv-strict", action="store_true", default=False,
                    help="fail tests that have no stored baseline instead of reporting them as new (default: off)")


@dataclass
class KVSession:
    """State shared by every test of one pytest session (kept in config.stash)."""

    config: pytest.Config
    device: str
    store: BaselineStore
    results_dir: Path
    models: dict = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    passed: set[str] = field(default_factory=set)
    calibration: float | None = None
    fingerprint: dict | None = None
    warnings: list[str] = field(default_factory=list)
    trace_override: object | None = None

    def machine(self) -> dict:
        if self.fingerprint is None:
            from pytest_kvcache.machine import fingerprint

            self.fingerprint = fingerprint(self.device)
        return self.fingerprint

    def calibration_s(self) -> float:
        if self.calibration is None:
            from pytest_kvcache.machine import calibrate

            self.calibration = calibrate(self.device)
        return self.calibration

    def record(self, item: pytest.Item, measurement: Measurement) -> Outcome:
        """Compare a measurement with its baseline; fails the test on a regression unless updating."""
        thresholds = {}
        for marker in reversed(list(item.iter_markers("kv_thresholds"))):
            for metric, value in marker.kwargs.items():
                rule_for(metric)
                thresholds[metric] = float(value)
        baseline = self.store.get(measurement.suite, measurement.test_id)
        if baseline is not None:
            from pytest_kvcache.machine import fingerprint_mismatch

            diff = fingerprint_mismatch(baseline.machine, measurement.machine)
            if diff:
                note = f"{measurement.suite}: baseline from another machine ({'; '.join(diff)}); compared with calibration"
                if note not in self.warnings:
                    self.warnings.append(note)
        updating = self.config.getoption("kv_update_baselines")
        outcome = Outcome(measurement, compare(baseline, measurement, thresholds), item.nodeid, updated=updating)
        self.outcomes.append(outcome)
        if updating:
            return outcome
        if baseline is None and self.config.getoption("kv_strict"):
            pytest.fail(f"no baseline for {measurement.test_id} in {self.store.path(measurement.suite)} "
                        "(--kv-strict): record one with --kv-update-baselines", pytrace=False)
        if any(v.fails for v in outcome.verdicts):
            pytest.fail(failure_message(outcome), pytrace=False)
        return outcome


SESSION = pytest.StashKey[KVSession]()


def kv_session(config: pytest.Config) -> KVSession:
    return config.stash[SESSION]


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS.values():
        config.addinivalue_line("markers", line)
    device = "cpu"
    if config.getoption("gpu"):
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
    if device == "cpu" or config.getoption("kv_threads"):
        import torch

        torch.set_num_threads(config.getoption("kv_threads") or 1)
    root = Path(config.rootpath)
    baselines = Path(config.getoption("kv_baselines") or root / "baselines")
    results = Path(config.getoption("kv_results") or root / "results")
    from pytest_kvcache.machine import machine_id

    session = KVSession(config, device, BaselineStore(baselines, machine_id(device)), results)
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
        default = ["tiny", "llama-1b"] if config.getoption("gpu") else ["tiny"]
        names = config.getoption("kv_model") or (list(marker.args) if marker else default)
        for name in names:
            get_spec(name)
        metafunc.parametrize("kv_model", names, indirect=True, ids=names)
    if "kv_strategy" in metafunc.fixturenames and not _directly_parametrized(metafunc, "kv_strategy"):
        override = config.getoption("kv_strategy")
        marker = metafunc.definition.get_closest_marker("kv_strategies")
        specs = override or (list(marker.args) if marker else ["full"])
        labels = [parse_strategy(s).label() for s in specs]
        metafunc.parametrize("kv_strategy", labels, indirect=True, ids=[_param_id(s) for s in labels])


def _directly_parametrized(metafunc: pytest.Metafunc, name: str) -> bool:
    return any(name in m.args[0] for m in metafunc.definition.iter_markers("parametrize") if m.args)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("gpu"):
        return
    skip = pytest.mark.skip(reason="GPU test: run with --gpu on a CUDA machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call" and report.passed and SESSION in item.config.stash:
        kv_session(item.config).passed.add(item.nodeid)
    if call.excinfo is not None and isinstance(call.excinfo.value, KVConfigError):
        report.longrepr = f"{type(call.excinfo.value).__name__}: {call.excinfo.value}"
    return report


def _outcome_json(o: Outcome) -> dict:
    m = o.measurement
    return {
        "nodeid": o.nodeid,
        "test_id": m.test_id,
        "suite": m.suite,
        "status": o.status,
        "updated": o.updated,
        "entry": m.to_entry(),
        "summary": {name: m.summary(name) for name in m.metrics},
        "verdicts": verdicts_to_json(o.verdicts),
    }


def pytest_testnodedown(node, error) -> None:
    """xdist controller: collect the measurements a worker made."""
    payload = getattr(node, "workeroutput", {}).get("kvcache")
    if not payload:
        return
    from pytest_kvcache.baselines import Verdict

    session = kv_session(node.config)
    data = json.loads(payload)
    session.fingerprint = session.fingerprint or data["machine"]
    for o in data["outcomes"]:
        m = Measurement.from_entry(o["test_id"], o["suite"], o["entry"], data["machine"])
        session.outcomes.append(Outcome(m, [Verdict(**v) for v in o["verdicts"]], o["nodeid"], o["updated"]))
    session.passed.update(data["passed"])
    session.calibration = session.calibration or data["calibration"]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if "pytest_kvcache.engines.vllm" in sys.modules:
        sys.modules["pytest_kvcache.engines.vllm"].shutdown_all()
    config = session.config
    if SESSION not in config.stash:
        return
    kv = kv_session(config)
    if _is_worker(config):
        if kv.outcomes:
            config.workeroutput["kvcache"] = json.dumps({
                "machine": kv.machine(),
                "calibration": kv.calibration,
                "outcomes": [_outcome_json(o) for o in kv.outcomes],
                "passed": sorted(kv.passed),
            })
        return
    if not kv.outcomes:
        return
    stamp = datetime.now(timezone.utc)
    results = {
        "format": RESULTS_FORMAT,
        "created": stamp.isoformat(timespec="seconds"),
        "machine": kv.machine(),
        "machine_id": kv.store.machine_id,
        "calibration_s": kv.calibration,
        "outcomes": [_outcome_json(o) for o in kv.outcomes],
    }
    path = _unused_path(kv.results_dir, f"kvcache-{stamp:%Y%m%d-%H%M%S}")
    write_json_atomic(path, results)
    write_json_atomic(kv.results_dir / "latest.json", results)
    kv.warnings.insert(0, f"results written to {path}")
    if config.getoption("kv_update_baselines"):
        _update_baselines(kv)


def _unused_path(folder: Path, stem: str) -> Path:
    """results/<stem>.json, or <stem>-2.json, ... so sessions in the same second keep their own file."""
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    return path


def _update_baselines(kv: KVSession) -> None:
    by_suite: dict[str, list[Measurement]] = {}
    for o in kv.outcomes:
        if o.nodeid in kv.passed:
            by_suite.setdefault(o.measurement.suite, []).append(o.measurement)
    for suite, measurements in sorted(by_suite.items()):
        try:
            path = kv.store.update(suite, measurements, kv.machine())
        except BaselineError as e:
            kv.warnings.append(f"baselines NOT updated: {e}")
            continue
        kv.warnings.append(f"baselines updated: {path} ({len(measurements)} tests)")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if SESSION not in config.stash or _is_worker(config):
        return
    kv = kv_session(config)
    if not kv.outcomes:
        return
    tr = terminalreporter
    tr.write_sep("=", "KV-cache benchmark summary")
    outcomes = sorted(kv.outcomes, key=lambda o: o.nodeid)
    tr.write_line(f"machine {kv.store.machine_id}; baselines {kv.store.root}; calibration "
                  f"{(kv.calibration or 0) * 1e3:.1f} ms")
    tr.write_line(tables(outcomes))
    changes = changes_table(outcomes)
    if changes:
        tr.write_sep("-", "metrics that changed (improved: refresh the baseline with --kv-update-baselines)")
        tr.write_line(changes)
    for line in kv.warnings:
        tr.write_line(line)
