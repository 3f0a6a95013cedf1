"""Stored baselines: baselines/<machine>/<suite>.json, read once per suite, validated before any test runs, written
only when asked, under a file lock and re-read at write time so concurrent sessions keep each other's entries.

An entry is keyed by test id and identified by its configuration hash: an update never overwrites an entry of
another configuration (it says so and how to replace it), and replaces entries that cannot be read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from pytest_kvcache.gate import config_differences
from pytest_kvcache.results import (
    BaselineFile,
    FormatError,
    Measurement,
    OlderFormat,
    read_baselines,
    write_json_atomic,
)

LOCK_TIMEOUT_S = 120


@dataclass
class UpdateReport:
    """What one update of a suite's file did."""

    path: Path
    written: list[str] = field(default_factory=list)
    replaced_unreadable: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    older_format: str | None = None


class BaselineStore:
    """baselines/<machine>/<suite>.json for one machine."""

    def __init__(self, root: Path, machine_id: str) -> None:
        self.root = Path(root)
        self.machine_id = machine_id
        self._files: dict[str, BaselineFile] = {}

    def path(self, suite: str) -> Path:
        return self.root / self.machine_id / f"{suite}.json"

    def load(self, suite: str) -> BaselineFile:
        """The suite's file (no file: no entries); FormatError if the file itself cannot be used."""
        if suite not in self._files:
            self._files[suite] = read_baselines(self.path(suite))
        return self._files[suite]

    def problems(self, suites: list[str]) -> list[str]:
        """One line per file or entry of these suites that cannot be used, for the check before tests run."""
        lines = []
        for suite in sorted(set(suites)):
            try:
                lines += list(self.load(suite).problems(suite).values())
            except FormatError as e:
                lines.append(str(e))
        return lines

    def unreadable(self, suite: str) -> dict[str, str]:
        return self.load(suite).problems(suite)

    def get(self, suite: str, test_id: str) -> Measurement | None:
        return self.load(suite).measurement(test_id, suite)

    def update(self, suite: str, measurements: list[Measurement], machine: dict, replace: bool = False) -> UpdateReport:
        """Merge measurements into the file as it is on disk now (other tests' entries are kept), atomically.

        An entry of another configuration is kept unless `replace`; an entry that cannot be read is replaced, and so
        is a file of an older format (its entries cannot be read by this version)."""
        path = self.path(suite)
        path.parent.mkdir(parents=True, exist_ok=True)
        report = UpdateReport(path)
        try:
            with FileLock(path.parent / f".{path.name}.lock", timeout=LOCK_TIMEOUT_S):
                try:
                    current = read_baselines(path)
                except OlderFormat as e:  # nothing in it can be read: this recording replaces it
                    report.older_format = str(e)
                    current = BaselineFile(path, {}, {})
                unreadable = current.problems(suite)
                for m in measurements:
                    old = current.entries.get(m.test_id)
                    if m.test_id in unreadable:
                        report.replaced_unreadable.append(m.test_id)
                    elif old is not None and not replace and old.get("config_hash") != m.config_hash:
                        report.refused[m.test_id] = config_differences(old.get("config", {}), m.config)
                        continue
                    current.entries[m.test_id] = m.to_entry()
                    report.written.append(m.test_id)
                if report.written:
                    current.machine = machine
                    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
                    write_json_atomic(path, current.to_json(stamp))
                self._files[suite] = current
        except Timeout:
            raise FormatError(f"baseline {path} stayed locked for {LOCK_TIMEOUT_S} s by another session: wait for "
                              f"it, or delete {path.parent}/.{path.name}.lock if no session is running") from None
        return report
