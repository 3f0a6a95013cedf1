"""Readable output: the terminal summary table, regression messages and markdown diffs (tabulate)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from tabulate import tabulate

from pytest_kvcache.baselines import NEW, REGRESSED, UNCHANGED, Measurement, Verdict, overall, representative

MIB = 2**20


@dataclass
class Outcome:
    """A measurement with its verdicts, as the summary and the results file show it."""

    measurement: Measurement
    verdicts: list[Verdict]
    nodeid: str
    updated: bool = False

    @property
    def status(self) -> str:
        word = overall(self.verdicts)
        return f"{word} (baseline updated)" if self.updated else word


def _value(m: Measurement, metric: str, scale: float = 1.0, digits: int = 1) -> str:
    if metric not in m.metrics or not m.metrics[metric]:
        return "-"
    return f"{representative(metric, m.metrics[metric]) / scale:.{digits}f}"


SUMMARY_HEADERS = ["test", "TTFT p50 ms", "TPOT p50 ms", "E2E p50 ms", "out tok/s", "KV peak MiB",
                   "evicted tok", "preempt", "verdict"]


def summary_table(outcomes: list[Outcome], fmt: str = "simple") -> str:
    """One row per measurement: the headline metrics and the test's verdict."""
    rows = []
    for o in outcomes:
        m = o.measurement
        rows.append([
            m.test_id,
            _value(m, "ttft_ms"),
            _value(m, "tpot_ms", digits=2),
            _value(m, "e2e_ms"),
            _value(m, "output_throughput"),
            _value(m, "kv_peak_bytes", MIB, 2),
            _value(m, "kv_tokens_evicted", digits=0),
            _value(m, "preemptions", digits=0),
            o.status,
        ])
    return tabulate(rows, headers=SUMMARY_HEADERS, tablefmt=fmt, disable_numparse=True)


QUALITY_HEADERS = ["test", "token agreement", "perplexity ratio", "passkey accuracy", "verdict"]


def quality_table(outcomes: list[Outcome], fmt: str = "simple") -> str:
    """One row per quality measurement: agreement with the full cache, perplexity ratio, passkey accuracy."""
    rows = [
        [o.measurement.test_id, _value(o.measurement, "token_agreement", digits=3),
         _value(o.measurement, "perplexity_ratio", digits=3), _value(o.measurement, "passkey_accuracy", digits=2),
         o.status]
        for o in outcomes
    ]
    return tabulate(rows, headers=QUALITY_HEADERS, tablefmt=fmt, disable_numparse=True)


def tables(outcomes: list[Outcome], fmt: str = "simple") -> str:
    """The serving table and, when quality was measured, the quality table."""
    serving = [o for o in outcomes if "token_agreement" not in o.measurement.metrics]
    quality = [o for o in outcomes if "token_agreement" in o.measurement.metrics]
    parts = [summary_table(serving, fmt)] if serving else []
    if quality:
        parts.append(quality_table(quality, fmt))
    return "\n\n".join(parts)


def changes_table(outcomes: list[Outcome], fmt: str = "simple") -> str:
    """Every metric whose verdict is not `unchanged`, so regressions and stale baselines stand out."""
    rows = []
    for o in outcomes:
        all_new = all(v.status == NEW for v in o.verdicts)
        for v in o.verdicts:
            if v.status == UNCHANGED or (all_new and v.status == NEW):
                continue
            change = "-" if v.change is None else f"{v.change:+.1%}"
            base = "-" if v.baseline is None else f"{v.baseline:.4g}"
            cur = "-" if v.current is None else f"{v.current:.4g}"
            rows.append([o.measurement.test_id, v.metric, base, cur, change, v.status, v.detail])
    if not rows:
        return ""
    return tabulate(rows, headers=["test", "metric", "baseline", "current", "change", "verdict", "evidence"],
                    tablefmt=fmt, disable_numparse=True)


def failure_message(outcome: Outcome) -> str:
    """What a failing test says: each regressed metric with baseline, current, change, evidence, and how to rerun."""
    lines = [f"KV-cache benchmark regression in {outcome.measurement.test_id}:"]
    lines += [f"  {v.describe()}" for v in outcome.verdicts if v.status == REGRESSED]
    lines.append(f"reproduce: pytest {shlex.quote(outcome.nodeid)}")
    lines.append("accept the new numbers: add --kv-update-baselines")
    return "\n".join(lines)
