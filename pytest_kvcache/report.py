"""Readable output: the terminal summary table, regression messages and markdown diffs (tabulate)."""

from __future__ import annotations

import shlex

from tabulate import tabulate

from pytest_kvcache.metrics import MIB
from pytest_kvcache.results import NEW, NOT_COMPARABLE, REGRESSED, UNCHANGED, UNKNOWN, Measurement, Outcome



def _value(m: Measurement, metric: str, scale: float = 1.0, digits: int = 1) -> str:
    if not m.metrics.get(metric):
        return "-"
    return f"{m.summary(metric) / scale:.{digits}f}"


SUMMARY_COLUMNS = [("TTFT p50 ms", "ttft_ms", 1, 1), ("TPOT p50 ms", "tpot_ms", 1, 2), ("E2E p50 ms", "e2e_ms", 1, 1),
                   ("out tok/s", "output_throughput", 1, 1), ("CPU ms/tok", "cpu_ms_per_token", 1, 2),
                   ("KV peak MiB", "kv_peak_bytes", MIB, 2), ("evicted tok", "kv_tokens_evicted", 1, 0),
                   ("preempt", "preemptions", 1, 0)]
QUALITY_SUITES = ("test_quality", "test_retrieval")
SUMMARY_HEADERS = ["test", *(title for title, *_ in SUMMARY_COLUMNS), "verdict"]
QUALITY_COLUMNS = [("top-1 agreement", "top1_agreement", 1, 3), ("KL nats", "kl_divergence", 1, 4),
                   ("perplexity ratio", "perplexity_ratio", 1, 3), ("passkey", "passkey_accuracy", 1, 2),
                   ("needle", "needle_accuracy", 1, 2), ("multi-key", "multikey_accuracy", 1, 2),
                   ("var. tracking", "vartrack_accuracy", 1, 2)]


def _table(outcomes: list[Outcome], columns: list, fmt: str, extra: tuple[str, dict] | None = None) -> str:
    """One row per test: its metric columns, then `extra` (title, values by _pair) if given, then the verdict."""
    rows = [[o.measurement.test_id] + [_value(o.measurement, name, scale, digits) for _, name, scale, digits in columns]
            + ([extra[1].get(_pair(o), "-")] if extra else []) + [o.status] for o in outcomes]
    headers = ["test", *(title for title, *_ in columns), *([extra[0]] if extra else []), "verdict"]
    return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)


def _pair(o: Outcome) -> tuple:
    return o.measurement.config.get("model"), o.measurement.config.get("strategy")


def _speeds(serving: list[Outcome]) -> dict[tuple, str]:
    """(model, strategy) -> the median TPOT of the first serving test of that pair in this session."""
    speeds: dict[tuple, str] = {}
    for o in serving:
        if o.measurement.metrics.get("tpot_ms"):
            speeds.setdefault(_pair(o), _value(o.measurement, "tpot_ms", 1, 2))
    return speeds


def tables(outcomes: list[Outcome], fmt: str = "simple") -> str:
    """The serving table and, when quality was measured, the quality table: one row per test, each strategy's
    quality beside its speed (TPOT of a serving test of the same model and strategy in this session, if any)."""
    quality = [o for o in outcomes if o.measurement.suite in QUALITY_SUITES]
    serving = [o for o in outcomes if o.measurement.suite not in QUALITY_SUITES]
    parts = [_table(serving, SUMMARY_COLUMNS, fmt)] if serving else []
    if quality:
        columns = [c for c in QUALITY_COLUMNS if any(o.measurement.metrics.get(c[1]) for o in quality)]
        parts.append(_table(quality, columns, fmt, ("TPOT p50 ms", _speeds(serving))))
    return "\n\n".join(parts)


def changes_table(outcomes: list[Outcome], fmt: str = "simple") -> str:
    """Every metric whose verdict says something (not unchanged or unknown), so regressions and stale baselines
    stand out; tests with no baseline at all are left out."""
    rows = []
    for o in outcomes:
        all_new = all(v.status == NEW for v in o.verdicts)
        for v in o.verdicts:
            if v.status in (UNCHANGED, UNKNOWN) or (all_new and v.status == NEW):
                continue
            change = "-" if v.change is None else f"{v.change:+.1%}"
            base = "-" if v.baseline is None else f"{v.baseline:.4g}"
            cur = "-" if v.current is None else f"{v.current:.4g}"
            rows.append([o.measurement.test_id, v.metric, base, cur, change, v.status, v.detail])
    if not rows:
        return ""
    return tabulate(rows, headers=["test", "metric", "baseline", "current", "change", "verdict", "evidence"],
                    tablefmt=fmt, disable_numparse=True)


def summary_text(outcomes: list[Outcome], fmt: str = "simple") -> tuple[str, str]:
    """(table of tests, table of changed metrics) as the terminal summary and `kvbench diff` print them."""
    return tables(outcomes, fmt), changes_table(outcomes, fmt)


def failure_message(outcome: Outcome) -> str:
    """What a failing test says: each regressed metric with baseline, current, change, evidence, and how to rerun."""
    lines = [f"KV-cache benchmark regression in {outcome.measurement.test_id}:"]
    lines += [f"  {v.describe()}" for v in outcome.verdicts if v.status == REGRESSED]
    lines.append(f"reproduce: pytest {shlex.quote(outcome.nodeid)}")
    lines.append("accept the new numbers: add --kv-update-baselines")
    return "\n".join(lines)


def not_comparable_advice(outcome: Outcome) -> str | None:
    """One line saying which metrics were not compared, why, and what to do; None when all were compared."""
    skipped = [v for v in outcome.verdicts if v.status == NOT_COMPARABLE]
    if not skipped:
        return None
    why = skipped[0].detail
    if why.startswith("configuration differs"):
        fix = ("record a baseline for this configuration with --kv-replace-baselines, or run with the suite's "
               "default options")
    elif why.startswith("baseline from another machine"):
        fix = "record baselines on this machine type with --kv-update-baselines, or use `kvbench compare`"
    elif why.startswith("other processes took this CPU"):
        fix = "the machine is busy: rerun when it is quieter, or use `kvbench compare`, which measures both trees now"
    else:
        fix = "the machine's speed changed too much since the baseline: rerun on a quieter machine or use " \
              "`kvbench compare`"
    what = "every metric" if len(skipped) == len(outcome.verdicts) else f"{len(skipped)} time metrics"
    return f"{outcome.measurement.test_id}: {what} not comparable: {why}; {fix}"
