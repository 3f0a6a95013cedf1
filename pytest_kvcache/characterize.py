"""The study view of a results file: which strategy wins at which budget and request rate, as markdown and plots."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tabulate import tabulate

from pytest_kvcache.results import Measurement
from pytest_kvcache.strategies import parse_strategy


def _budget(label: str) -> float | None:
    budget = getattr(parse_strategy(label), "budget", None)
    return float(budget) if isinstance(budget, float) else None


def _value(m: Measurement, metric: str) -> float | None:
    return m.summary(metric) if m.metrics.get(metric) else None


def budget_series(measurements: list[Measurement], metric: str) -> dict[str, list[tuple[float, float]]]:
    """metric against budget fraction, one series per strategy name (full and unbudgeted ones at 1.0)."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for m in measurements:
        value = _value(m, metric)
        if value is None:
            continue
        label = m.config.get("strategy", "full")
        series[label.split(":")[0] if _budget(label) is not None else label].append((_budget(label) or 1.0, value))
    return {name: sorted(points) for name, points in sorted(series.items())}


def _plot(series: dict[str, list[tuple[float, float]]], ylabel: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=name) if len(points) > 1 else ax.scatter(xs, ys, label=name)
    ax.set_xlabel("KV budget (fraction of each request's context)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PLOTS = [
    ("test_memory", "kv_peak_bytes", "peak resident KV (bytes)", "KV memory vs budget"),
    ("test_throughput", "output_throughput", "output tok/s", "Throughput under a KV memory limit"),
    ("test_quality", "top1_agreement", "teacher-forced top-1 agreement with full",
     "Agreement with the full cache vs budget (SmolLM2)"),
    ("test_quality", "kl_divergence", "KL(full || strategy), nats", "KL divergence vs budget (SmolLM2)"),
    ("test_quality", "perplexity_ratio", "perplexity / full", "Perplexity ratio vs budget (SmolLM2)"),
]

TABLE = [("ttft_ms", "TTFT p50 ms"), ("tpot_ms", "TPOT p50 ms"), ("output_throughput", "out tok/s"),
         ("kv_peak_bytes", "KV peak B"), ("kv_bytes_to_device", "to device B"), ("preemptions", "preempt"),
         ("top1_agreement", "top-1 agr."), ("kl_divergence", "KL"), ("perplexity_ratio", "ppl ratio"),
         ("passkey_accuracy", "passkey"), ("needle_accuracy", "needle"), ("multikey_accuracy", "multi-key"),
         ("vartrack_accuracy", "var. tracking")]


def write_report(measurements: list[Measurement], out: Path, source: str) -> Path:
    """report/README.md with one table per suite and the budget plots; returns the markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    by_suite: dict[str, list[Measurement]] = defaultdict(list)
    for m in measurements:
        by_suite[m.suite].append(m)
    lines = [f"# KV-cache characterization\n\nFrom `{source}`. Medians over rounds; exact counters per run.\n"]
    for suite, items in sorted(by_suite.items()):
        columns = [(metric, title) for metric, title in TABLE if any(_value(m, metric) is not None for m in items)]
        rows = [[m.test_id] + [_fmt(_value(m, metric)) for metric, _ in columns] for m in items]
        lines += [f"## {suite}\n", tabulate(rows, headers=["test"] + [t for _, t in columns], tablefmt="github"), ""]
    for suite, metric, ylabel, title in PLOTS:
        series = budget_series(by_suite.get(suite, []), metric)
        if series:
            name = f"{suite}-{metric}.png"
            _plot(series, ylabel, title, out / name)
            lines.append(f"![{title}]({name})\n")
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
