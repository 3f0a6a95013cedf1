"""The results and baseline file formats, owned here alone: records, version, load, dump and validation.

results/<stamp>.json  one pytest session: machine, session facts, one outcome per test (measurement, thresholds,
                      verdicts, status, error)
baselines/<machine>/<suite>.json  one entry per test: configuration + its hash, calibration, samples per metric

Both are versioned JSON (`FORMAT`); a file of another version, or one whose values cannot be used (NaN, empty or
non-numeric samples, calibration <= 0, unknown metrics, a configuration that does not match its hash) is refused
with a one-line FormatError that names the file, the entry and what to do. Writes are atomic, 0644, and leave no
temporary file behind a kill (O_TMPFILE where the filesystem has it, otherwise temporaries named after their
process, removed by the next writer once that process is gone).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.metrics import METRICS, metric
from pytest_kvcache.stats import median

FORMAT = 2
FILE_MODE = 0o644

# Test-level statuses (the gate's vocabulary; kvbench compare renders them as same/slower/faster/...).
IMPROVED, UNCHANGED, REGRESSED, UNKNOWN = "improved", "unchanged", "regressed", "unknown"
NEW, MISSING, NOT_COMPARABLE = "new", "missing", "not comparable"
OUT_OF_MEMORY = "out of memory"


class FormatError(KVConfigError):
    """A results or baseline file this version cannot use; the message names the file and what to do."""


class OlderFormat(FormatError):
    """A file written by an older version: readable by nothing here, replaceable by a new recording."""


def config_hash(config: dict) -> str:
    """Short stable hash of a measurement configuration (canonical JSON), the key of 'not comparable'."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def representative(name: str, samples: list[float]) -> float:
    """The single number shown for a metric: the median of its samples, or the worst round for memory."""
    rule = metric(name)
    if not samples:
        return math.nan
    if rule.kind == "memory":
        return float(max(samples))
    return median(samples)


@dataclass
class Measurement:
    """One test's result: the configuration it is comparable on, every metric as samples (one per round), the
    calibration (None where no machine-dependent metric was measured), the machine and what else was observed."""

    test_id: str
    suite: str
    config: dict
    metrics: dict[str, list[float]]
    calibration_s: float | None
    machine: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    def summary(self, name: str) -> float:
        return representative(name, self.metrics[name])

    def to_entry(self) -> dict:
        return {
            "config": self.config,
            "config_hash": self.config_hash,
            "calibration_s": self.calibration_s,
            "metrics": {name: {"samples": _round(values)} for name, values in self.metrics.items()},
            "machine": self.machine,
            "info": self.info,
        }

    @classmethod
    def from_entry(cls, test_id: str, suite: str, entry: object, machine: dict, where: str) -> Measurement:
        """Validate and read one entry; `where` names it in errors ('baselines/x.json entry test_a'). The entry's
        own machine fingerprint wins over the file's."""
        if not isinstance(entry, dict):
            raise FormatError(f"{where}: expected an object, got {type(entry).__name__}")
        config = entry.get("config")
        if not isinstance(config, dict):
            raise FormatError(f"{where}: 'config' must be an object")
        if entry.get("config_hash") != config_hash(config):
            raise FormatError(f"{where}: 'config_hash' does not match its configuration (edited by hand?)")
        metrics = entry.get("metrics")
        if not isinstance(metrics, dict):
            raise FormatError(f"{where}: 'metrics' must be an object of metric -> {{'samples': [...]}}")
        samples = {name: _samples(name, value, where) for name, value in metrics.items()}
        calibration = entry.get("calibration_s")
        if any(metric(name).calibrated for name in samples) or calibration is not None:
            if not _finite_number(calibration) or calibration <= 0:
                raise FormatError(f"{where}: calibration_s must be a number > 0 seconds, got {calibration!r}")
            calibration = float(calibration)
        info, own_machine = entry.get("info", {}), entry.get("machine", machine)
        if not isinstance(info, dict) or not isinstance(own_machine, dict):
            raise FormatError(f"{where}: 'info' and 'machine' must be objects")
        return cls(test_id, suite, config, samples, calibration, own_machine, info)


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _samples(name: str, value: object, where: str) -> list[float]:
    if name not in METRICS:
        raise FormatError(f"{where}: unknown metric {name!r} (written by a newer pytest-kvcache?): upgrade, or "
                          "re-record the entry")
    samples = value.get("samples") if isinstance(value, dict) else None
    if not isinstance(samples, list) or not samples:
        raise FormatError(f"{where}: metric {name!r} needs a non-empty 'samples' list")
    bad = [s for s in samples if not _finite_number(s)]
    if bad:
        raise FormatError(f"{where}: metric {name!r} has samples that are not finite numbers: {bad[0]!r}")
    return list(samples)


def _round(values: list[float]) -> list[float]:
    return [float(f"{v:.6g}") if isinstance(v, float) else v for v in values]


@dataclass
class Verdict:
    """Outcome for one metric. status: improved/unchanged/regressed/unknown/new/missing/not comparable."""

    metric: str
    status: str
    baseline: float | None
    current: float | None
    change: float | None
    threshold: float
    detail: str = ""
    low: float | None = None
    high: float | None = None

    @property
    def fails(self) -> bool:
        return self.status == REGRESSED

    def describe(self) -> str:
        unit = metric(self.metric).unit
        if self.status in (NEW, MISSING):
            return f"{self.metric}: {self.status}"
        change = "n/a" if self.change is None else f"{self.change:+.1%}"
        return (f"{self.metric}: baseline {_fmt(self.baseline)} {unit}, current {_fmt(self.current)} {unit}, "
                f"change {change} (threshold {self.threshold:.0%}; {self.detail}) -> {self.status}")


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1e6 and float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.4g}"


def _json_number(value: object) -> object:
    """Strict JSON has no NaN or infinity: an unbounded interval end is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def overall(verdicts: list[Verdict]) -> str:
    """One word for a test: regressed beats improved beats new, missing and not comparable; unknown is unchanged."""
    statuses = {v.status for v in verdicts}
    for status in (REGRESSED, IMPROVED, NEW, MISSING, NOT_COMPARABLE):
        if status in statuses:
            return status
    return UNCHANGED


@dataclass
class Outcome:
    """One test in a results file: its measurement, the thresholds it was judged with, and the verdicts (or the
    error that replaced them, e.g. out of memory)."""

    nodeid: str
    measurement: Measurement
    verdicts: list[Verdict]
    thresholds: dict[str, float] = field(default_factory=dict)
    updated: bool = False
    error: str | None = None
    error_status: str | None = None

    @property
    def status(self) -> str:
        if self.error_status:
            return self.error_status
        word = overall(self.verdicts)
        return f"{word} (baseline updated)" if self.updated else word

    def to_json(self) -> dict:
        m = self.measurement
        return {"nodeid": self.nodeid, "test_id": m.test_id, "suite": m.suite, "status": self.status,
                "updated": self.updated, "error": self.error, "error_status": self.error_status,
                "thresholds": self.thresholds, "entry": m.to_entry(),
                "verdicts": [{k: _json_number(x) for k, x in asdict(v).items()} for v in self.verdicts]}


@dataclass
class Results:
    """One session's results file."""

    created: str
    machine: dict
    machine_id: str
    session: dict
    outcomes: list[Outcome]

    def to_json(self) -> dict:
        return {"format": FORMAT, "kind": "results", "created": self.created, "machine": self.machine,
                "machine_id": self.machine_id, "session": self.session,
                "outcomes": [o.to_json() for o in self.outcomes]}


def _read_json(path: Path, what: str) -> object:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FormatError(f"no {what} at {path}: run `pytest suites/` first (it writes results/latest.json)") from None
    except OSError as e:
        raise FormatError(f"cannot read {what} {path}: {e.strerror}") from None
    return parse_json(text, f"{what} {path}")


def parse_json(text: str, where: str) -> object:
    """JSON text; errors name `where`. NaN and Infinity are read here and refused by `_check_format`."""
    if not text.strip():
        raise FormatError(f"{where} is empty: restore it from git or re-record it")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{where} is corrupt ({e.msg}, line {e.lineno}): restore it from git or re-record "
                          "it") from None


def _non_finite(value: object, path: str = "") -> str | None:
    """The location of the first NaN or infinity in a JSON value, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "the top level"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def _check_format(data: object, kind: str, where: str) -> dict:
    if not isinstance(data, dict):
        raise FormatError(f"{where} is not a pytest-kvcache {kind} file (expected a JSON object)")
    version = data.get("format")
    if version != FORMAT or data.get("kind", kind) != kind:
        older = isinstance(version, int) and version < FORMAT
        advice = ("written by an older pytest-kvcache: re-record it with `pytest suites/ --kv-update-baselines`"
                  if kind == "baselines" else "written by an older pytest-kvcache: rerun the suite with this version"
                  ) if older else "upgrade pytest-kvcache to read it"
        error = OlderFormat if older and data.get("kind", kind) == kind else FormatError
        raise error(f"{where} is a format-{version!r} {data.get('kind', kind)} file; this version reads "
                    f"format {FORMAT} {kind} files: {advice}")
    bad = _non_finite(data)
    if bad:
        raise FormatError(f"{where} holds NaN or infinity at {bad}, which is not a number: restore the file or "
                          "re-record it")
    return data


def load_results(path: Path) -> Results:
    """Read and validate a results file (or a folder's latest.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "latest.json"
    where = f"results {path}"
    data = _check_format(_read_json(path, "results"), "results", where)
    machine_id, machine = data.get("machine_id"), data.get("machine")
    if not isinstance(machine_id, str) or not machine_id:
        raise FormatError(f"{where} has no 'machine_id': it was not written by pytest-kvcache; rerun the suite")
    if not isinstance(machine, dict) or not isinstance(data.get("outcomes"), list):
        raise FormatError(f"{where} needs 'machine' (object) and 'outcomes' (list)")
    outcomes = [outcome_from_json(o, machine, f"{where} outcome {i}") for i, o in enumerate(data["outcomes"])]
    session = data.get("session", {})
    return Results(str(data.get("created", "")), machine, machine_id, session if isinstance(session, dict) else {},
                   outcomes)


def outcome_from_json(o: object, machine: dict, where: str) -> Outcome:
    """One outcome of a results file (or handed over by an xdist worker), validated."""
    if not isinstance(o, dict) or not all(isinstance(o.get(k), str) for k in ("nodeid", "test_id", "suite")):
        raise FormatError(f"{where}: needs string 'nodeid', 'test_id' and 'suite'")
    where = f"{where} ({o['test_id']})"
    thresholds = o.get("thresholds", {})
    if not isinstance(thresholds, dict) or any(k not in METRICS or not _finite_number(v) or v < 0
                                               for k, v in thresholds.items()):
        raise FormatError(f"{where}: 'thresholds' must map known metrics to numbers >= 0")
    entry = o.get("entry")
    error = o.get("error")
    if error and isinstance(entry, dict) and not entry.get("metrics"):
        m = Measurement(o["test_id"], o["suite"], entry.get("config", {}), {}, None, machine)
    else:
        m = Measurement.from_entry(o["test_id"], o["suite"], entry, machine, where)
    try:
        verdicts = [Verdict(**v) for v in o.get("verdicts", [])]
    except TypeError as e:
        raise FormatError(f"{where}: malformed verdict ({e})") from None
    return Outcome(o["nodeid"], m, verdicts, {k: float(v) for k, v in thresholds.items()}, bool(o.get("updated")),
                   error, o.get("error_status"))


@dataclass
class BaselineFile:
    """A suite's baselines: the machine they were recorded on and the raw entries (validated one by one)."""

    path: Path
    machine: dict
    entries: dict[str, object]

    def measurement(self, test_id: str, suite: str) -> Measurement | None:
        if test_id not in self.entries:
            return None
        return Measurement.from_entry(test_id, suite, self.entries[test_id], self.machine,
                                      f"baseline {self.path} entry {test_id!r}")

    def problems(self, suite: str) -> dict[str, str]:
        """test id -> one-line reason, for every entry that cannot be used."""
        out = {}
        for test_id in self.entries:
            try:
                self.measurement(test_id, suite)
            except FormatError as e:
                out[test_id] = str(e)
        return out

    def to_json(self, updated: str) -> dict:
        return {"format": FORMAT, "kind": "baselines", "machine": self.machine, "updated": updated,
                "entries": self.entries}


def parse_baselines(text: str | None, path: Path, where: str | None = None) -> BaselineFile:
    """A baseline file's text (None: no file, so no entries) checked for format; entries are checked on use."""
    where = where or f"baseline {path}"
    if text is None:
        return BaselineFile(path, {}, {})
    data = _check_format(parse_json(text, where), "baselines", where)
    entries, machine = data.get("entries"), data.get("machine", {})
    if not isinstance(entries, dict) or not isinstance(machine, dict):
        raise FormatError(f"{where} needs 'entries' and 'machine' objects")
    if not entries:
        raise FormatError(f"{where} has no entries: restore it from git or delete it and rerun with "
                          "--kv-update-baselines")
    return BaselineFile(path, machine, dict(entries))


def read_baselines(path: Path) -> BaselineFile:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = None
    return parse_baselines(text, path)


TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporaries left in `folder` by writers that no longer run (killed between link and rename)."""
    removed = []
    for path in folder.glob(".*.tmp"):
        match = TEMP_PATTERN.match(path.name)
        if match and not _pid_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_json_atomic(path: Path, data: dict) -> None:
    """Write sorted JSON so readers see the old file or the new one, never half of one; mode 0644."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    text = json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n"
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    unnamed = _open_unnamed(path.parent)
    try:
        fd = unnamed if unnamed is not None else os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, FILE_MODE)
            f.write(text)
            f.flush()
            os.fsync(fd)
            if unnamed is not None:
                _link(fd, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _link(fd: int, target: Path) -> None:
    """Give the unnamed file `fd` the name `target` (linkat through /proc, following the fd's link)."""
    folder = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(f"/proc/self/fd/{fd}", target.name, dst_dir_fd=folder, follow_symlinks=True)
    finally:
        os.close(folder)


def _open_unnamed(folder: Path) -> int | None:
    """An unnamed file in `folder` (O_TMPFILE): a kill before it is linked leaves nothing behind."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not Path("/proc/self/fd").is_dir():
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY, FILE_MODE)
    except OSError:
        return None
