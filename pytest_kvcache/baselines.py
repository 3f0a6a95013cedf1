"""Baselines: atomic JSON per machine and suite, per-metric comparison rules, and verdicts.

A time or rate metric regresses only when the change is both larger than its threshold and statistically
significant; exact counters must match; memory and quality compare against a tolerance. Time metrics are
scaled by the calibration workload measured in both sessions, so a slower machine is not read as a regression.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.stats import median, relative_change, significance

BASELINE_FORMAT = 1

QUALITY_EPSILON = 1e-6  # stored samples keep 6 significant digits: 2/3 is 0.666667

IMPROVED, UNCHANGED, REGRESSED, NEW, MISSING = "improved", "unchanged", "regressed", "new", "missing"


class BaselineError(KVConfigError):
    """A baseline file that cannot be read or used; the message names the file and what to do."""


@dataclass(frozen=True)
class MetricRule:
    """How one metric is compared. kind: time | rate | memory | exact | count | quality."""

    kind: str
    unit: str
    higher_is_better: bool = False
    threshold: float = 0.0
    slack: float = 0.0


RULES: dict[str, MetricRule] = {
    "ttft_ms": MetricRule("time", "ms", threshold=0.25),
    "tpot_ms": MetricRule("time", "ms", threshold=0.25),
    "itl_ms": MetricRule("time", "ms", threshold=0.25),
    "e2e_ms": MetricRule("time", "ms", threshold=0.25),
    "request_throughput": MetricRule("rate", "req/s", higher_is_better=True, threshold=0.20),
    "output_throughput": MetricRule("rate", "tok/s", higher_is_better=True, threshold=0.20),
    "goodput": MetricRule("rate", "req/s", higher_is_better=True, threshold=0.20),
    "rss_growth_bytes": MetricRule("memory", "B", threshold=0.25, slack=16 * 2**20),
    "peak_device_bytes": MetricRule("memory", "B", threshold=0.05),
    "allocator_peak_bytes": MetricRule("memory", "B", threshold=0.05),
    "kv_peak_bytes": MetricRule("memory", "B", threshold=0.10),
    "kv_allocated_bytes": MetricRule("memory", "B", threshold=0.0),
    "kv_cache_usage": MetricRule("memory", "", threshold=0.10, slack=0.02),
    "output_tokens": MetricRule("exact", "tok"),
    "kv_tokens_stored": MetricRule("exact", "tok"),
    "kv_tokens_evicted": MetricRule("exact", "tok"),
    "kv_tokens_kept": MetricRule("exact", "tok"),
    "kv_bytes_to_host": MetricRule("exact", "B"),
    "kv_bytes_to_device": MetricRule("exact", "B"),
    "preemptions": MetricRule("count", "", threshold=0.5),
    "harness_overhead": MetricRule("count", "", threshold=1.0, slack=0.01),
    "prefix_cache_hit_rate": MetricRule("quality", "", higher_is_better=True, threshold=0.02),
    "speculation_recall": MetricRule("quality", "", higher_is_better=True, threshold=0.05),
    "token_agreement": MetricRule("quality", "", higher_is_better=True, threshold=0.02),
    "passkey_accuracy": MetricRule("quality", "", higher_is_better=True, threshold=0.0),
    "perplexity_ratio": MetricRule("quality", "", threshold=0.02),
    "top1_agreement": MetricRule("quality", "", higher_is_better=True, threshold=0.02),
    "kl_divergence": MetricRule("quality", "nats", threshold=0.005),
    "first_divergence": MetricRule("quality", "tok", higher_is_better=True, threshold=2.0),
    "needle_accuracy": MetricRule("quality", "", higher_is_better=True, threshold=0.0),
    "multikey_accuracy": MetricRule("quality", "", higher_is_better=True, threshold=0.0),
    "vartrack_accuracy": MetricRule("quality", "", higher_is_better=True, threshold=0.0),
    "decode_step_ms": MetricRule("time", "ms", threshold=0.25),
    "roofline_fraction": MetricRule("rate", "", higher_is_better=True, threshold=0.20),
    "kv_peak_block_bytes": MetricRule("memory", "B", threshold=0.10),
}


def rule_for(metric: str) -> MetricRule:
    if metric not in RULES:
        raise KVConfigError(f"unknown metric {metric!r}: known metrics are {', '.join(RULES)}")
    return RULES[metric]


@dataclass
class Measurement:
    """One test's result: its configuration, the machine, and every metric as samples."""

    test_id: str
    suite: str
    config: dict
    metrics: dict[str, list[float]]
    calibration_s: float
    machine: dict = field(default_factory=dict)

    def summary(self, metric: str) -> float:
        return representative(metric, self.metrics[metric])

    def to_entry(self) -> dict:
        return {
            "config": self.config,
            "calibration_s": self.calibration_s,
            "metrics": {name: {"samples": _round(values)} for name, values in self.metrics.items()},
        }

    @classmethod
    def from_entry(cls, test_id: str, suite: str, entry: dict, machine: dict) -> Measurement:
        metrics = {name: list(value["samples"]) for name, value in entry["metrics"].items()}
        return cls(test_id, suite, entry.get("config", {}), metrics, float(entry["calibration_s"]), machine)


def _round(values: list[float]) -> list[float]:
    return [float(f"{v:.6g}") if isinstance(v, float) else v for v in values]


def representative(metric: str, samples: list[float]) -> float:
    """The single number shown for a metric: the median, or the worst round for memory."""
    rule = rule_for(metric)
    if not samples:
        return math.nan
    if rule.kind == "memory":
        return float(max(samples))
    return median(samples)


@dataclass
class Verdict:
    """Outcome for one metric; `fails` says whether it should fail the test."""

    metric: str
    status: str
    baseline: float | None
    current: float | None
    change: float | None
    threshold: float
    detail: str = ""

    @property
    def fails(self) -> bool:
        return self.status == REGRESSED

    def describe(self) -> str:
        unit = rule_for(self.metric).unit
        if self.status in (NEW, MISSING):
            return f"{self.metric}: {self.status}"
        change = "n/a" if self.change is None else f"{self.change:+.1%}"
        return (
            f"{self.metric}: baseline {_fmt(self.baseline)} {unit}, current {_fmt(self.current)} {unit}, "
            f"change {change} (threshold {self.threshold:.0%}; {self.detail}) -> {self.status}"
        )


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1e6 and float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.4g}"


def _scaled(rule: MetricRule, samples: list[float], scale: float) -> list[float]:
    if rule.kind == "time":
        return [s * scale for s in samples]
    if rule.kind == "rate":
        return [s / scale for s in samples]
    return list(samples)


def compare_metric(metric: str, baseline: list[float], current: list[float], scale: float = 1.0,
                   threshold: float | None = None) -> Verdict:
    """Compare one metric's samples; `scale` = baseline calibration / current calibration."""
    rule = rule_for(metric)
    threshold = rule.threshold if threshold is None else threshold
    current = _scaled(rule, current, scale)
    base_value, cur_value = representative(metric, baseline), representative(metric, current)
    change = relative_change(base_value, cur_value)
    worse = change < 0 if rule.higher_is_better else change > 0
    if rule.kind == "exact":
        if any(c != b for c in current for b in baseline):
            return Verdict(metric, REGRESSED, base_value, cur_value, change, 0.0, f"exact counter changed: {current}")
        return Verdict(metric, UNCHANGED, base_value, cur_value, change, 0.0, "exact match")
    if rule.kind == "quality":
        delta = cur_value - base_value
        bad = -delta if rule.higher_is_better else delta
        slack = threshold + QUALITY_EPSILON
        status = REGRESSED if bad > slack else IMPROVED if -bad > slack else UNCHANGED
        return Verdict(metric, status, base_value, cur_value, change, threshold, f"absolute change {delta:+.4g}")
    if rule.kind in ("memory", "count"):
        beyond = abs(change) > threshold and abs(cur_value - base_value) > rule.slack
        status = (REGRESSED if worse else IMPROVED) if beyond else UNCHANGED
        return Verdict(metric, status, base_value, cur_value, change, threshold, "tolerance")
    significant, how = significance(baseline, current)
    if significant and abs(change) > threshold:
        status = REGRESSED if worse else IMPROVED
    else:
        status = UNCHANGED
    detail = how if scale == 1.0 else f"{how}; calibration x{scale:.3f}"
    return Verdict(metric, status, base_value, cur_value, change, threshold, detail)


def compare(baseline: Measurement | None, current: Measurement, thresholds: dict[str, float] | None = None) -> list[Verdict]:
    """Verdicts for every metric of either side; no baseline means every metric is new."""
    thresholds = thresholds or {}
    if baseline is None:
        return [Verdict(m, NEW, None, current.summary(m), None, 0.0) for m in current.metrics]
    scale = baseline.calibration_s / current.calibration_s if current.calibration_s > 0 else 1.0
    unknown = sorted(set(baseline.metrics) - set(RULES))
    if unknown:
        raise BaselineError(
            f"baseline for {current.test_id} has metrics this version does not know ({', '.join(unknown)}): "
            "upgrade pytest-kvcache or rerun with --kv-update-baselines"
        )
    verdicts = []
    for metric in sorted(set(baseline.metrics) | set(current.metrics), key=list(RULES).index):
        if metric not in current.metrics:
            verdicts.append(Verdict(metric, MISSING, baseline.summary(metric), None, None, 0.0, "not measured now"))
        elif metric not in baseline.metrics:
            verdicts.append(Verdict(metric, NEW, None, current.summary(metric), None, 0.0))
        else:
            verdicts.append(compare_metric(metric, baseline.metrics[metric], current.metrics[metric], scale,
                                           thresholds.get(metric)))
    return verdicts


def overall(verdicts: list[Verdict]) -> str:
    """One word for a test: regressed beats improved beats new beats unchanged."""
    statuses = {v.status for v in verdicts}
    for status in (REGRESSED, IMPROVED, NEW, MISSING):
        if status in statuses:
            return status
    return UNCHANGED


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class BaselineStore:
    """baselines/<machine>/<suite>.json; read once per suite, written only when asked, merged per test."""

    def __init__(self, root: Path, machine_id: str) -> None:
        self.root = Path(root)
        self.machine_id = machine_id
        self._cache: dict[str, dict] = {}

    def path(self, suite: str) -> Path:
        return self.root / self.machine_id / f"{suite}.json"

    def _read(self, suite: str) -> dict:
        if suite in self._cache:
            return self._cache[suite]
        path = self.path(suite)
        if not path.exists():
            data = {"format": BASELINE_FORMAT, "machine": {}, "entries": {}}
        else:
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise BaselineError(
                    f"baseline {path} is corrupt ({e.msg}, line {e.lineno}): restore it from git "
                    f"(git checkout -- {path}) or delete it and rerun with --kv-update-baselines"
                ) from None
            if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT or not isinstance(data.get("entries"), dict):
                raise BaselineError(
                    f"baseline {path} is not a format-{BASELINE_FORMAT} baseline file: restore it from git or delete it "
                    "and rerun with --kv-update-baselines"
                )
        self._cache[suite] = data
        return data

    def machine(self, suite: str) -> dict:
        return self._read(suite).get("machine", {})

    def get(self, suite: str, test_id: str) -> Measurement | None:
        data = self._read(suite)
        entry = data["entries"].get(test_id)
        if entry is None:
            return None
        try:
            return Measurement.from_entry(test_id, suite, entry, data.get("machine", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise BaselineError(
                f"baseline {self.path(suite)} entry {test_id!r} is malformed ({type(e).__name__}: {e}): "
                "restore the file from git or rerun this test with --kv-update-baselines"
            ) from None

    def update(self, suite: str, measurements: list[Measurement], machine: dict) -> Path:
        """Merge measurements into the suite's file (other tests' entries are kept) and write it atomically."""
        path = self.path(suite)
        data = json.loads(json.dumps(self._read(suite)))
        data["format"] = BASELINE_FORMAT
        data["machine"] = machine
        data["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for m in measurements:
            data["entries"][m.test_id] = m.to_entry()
        write_json_atomic(path, data)
        self._cache[suite] = data
        return path


def verdicts_to_json(verdicts: list[Verdict]) -> list[dict]:
    return [asdict(v) for v in verdicts]
