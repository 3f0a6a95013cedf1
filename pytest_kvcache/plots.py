"""The study's figures (matplotlib, Agg), one fixed colour per strategy in every figure so a reader learns it once:
the colour says the strategy, the marker its other parameters, the line style its budget."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pytest_kvcache.study import MIB, Row

if TYPE_CHECKING:  # matplotlib loads when a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

COLOURS = {"full": "#000000", "none": "#7f7f7f", "streaming": "#ff7f0e", "h2o": "#2ca02c", "infinigen": "#d62728",
           "quantized": "#9467bd", "paged": "#8c564b", "paged:preempt=swap": "#e377c2", "vllm": "#1f77b4",
           "vllm-prefix": "#17becf", "vllm-offload": "#bcbd22"}
OTHER = "#c7c7c7"  # a strategy registered after this map was written
MARKERS = "osD^vPX*"
BUDGET_STYLES = ["-", "--", "-.", ":"]  # budget 1.0, then each smaller budget
PANEL = (4.8, 3.4)  # inches per panel


def colour(row: Row) -> str:
    """The strategy's colour: its own entry (e.g. paged:preempt=swap), else its name's."""
    return COLOURS.get(row.series, COLOURS.get(row.kind, OTHER))


@dataclass(frozen=True)
class Palette:
    """Markers and line styles fixed over the whole study, so a variant looks the same in every figure."""

    markers: dict[str, str]
    styles: dict[float | None, str]

    @classmethod
    def of(cls, rows: list[Row]) -> Palette:
        by_kind: dict[str, set[str]] = defaultdict(set)
        for r in rows:
            by_kind[r.kind].add(r.series)
        markers = {s: MARKERS[i % len(MARKERS)] for series in by_kind.values() for i, s in enumerate(sorted(series))}
        budgets = sorted({r.budget for r in rows if r.budget is not None}, reverse=True)
        styles = {b: BUDGET_STYLES[min(i, len(BUDGET_STYLES) - 1)] for i, b in enumerate(budgets)}
        return cls(markers, styles)

    def marker(self, row: Row) -> str:
        return self.markers.get(row.series, "o")

    def style(self, row: Row) -> str:
        return self.styles.get(row.budget, "-")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(panels: int, title: str, cols: int = 3) -> tuple[Figure, list[Axes]]:
    cols = min(cols, panels)
    rows = math.ceil(panels / cols)
    fig, axes = _pyplot().subplots(rows, cols, figsize=(PANEL[0] * cols, PANEL[1] * rows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes.flat[:panels])


def _key(ax: Axes, palette: Palette, rows: list[Row]) -> None:
    """Legend entries for the strategies of a panel, one per series, filled, whatever the points look like."""
    for r in {r.series: r for r in rows}.values():
        ax.scatter([], [], color=colour(r), marker=palette.marker(r), label=r.series)


def _finish(fig: Figure, axes: list[Axes]) -> Figure:
    """One legend for the figure (each label once), right of the panels; grids on."""
    seen: dict[str, object] = {}
    for ax in axes:
        ax.grid(alpha=0.3)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    return fig


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (legend included); the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _rate_axis(ax: Axes, rates: list[float]) -> dict[float, float]:
    """x position of each rate on a log2 axis; rate inf sits two octaves right of the highest, labelled."""
    finite = sorted({r for r in rates if math.isfinite(r)})
    where = {r: r for r in finite}
    if any(math.isinf(r) for r in rates):
        where[math.inf] = finite[-1] * 4 if finite else 1.0
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(where.values()), ["all at\nt=0" if math.isinf(r) else f"{r:g}" for r in where])
    ax.minorticks_off()
    ax.set_xlabel("request rate (req/s)")
    return where


LATENCY = [("ttft_ms", "TTFT p50"), ("ttft_p90_ms", "TTFT p90"), ("tpot_ms", "TPOT p50"), ("tpot_p90_ms", "TPOT p90")]


def latency_vs_rate(rows: list[Row], palette: Palette, title: str) -> Figure:
    """TTFT and TPOT p50/p90 against request rate, one line per strategy label."""
    fig, axes = _figure(len(LATENCY), title, cols=2)
    by_label: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_label[r.label].append(r)
    for ax, (metric, name) in zip(axes, LATENCY):
        where = _rate_axis(ax, [r.rate for r in rows])
        for label, items in sorted(by_label.items()):
            look = {"marker": palette.marker(items[0]), "color": colour(items[0])}
            points = sorted((r.rate, r.value(metric)) for r in items if r.value(metric) is not None)
            finite = [(where[x], y) for x, y in points if math.isfinite(x)]
            if finite:
                ax.plot(*zip(*finite), linestyle=palette.style(items[0]), label=label, **look)
            for x, y in points[len(finite):]:  # rate inf: a point apart, not a continuation of the line
                ax.plot([where[x]], [y], linestyle="none", label=label, **look)
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(name)
    return _finish(fig, axes)


def throughput_vs_memory(groups: list[tuple[str, list[Row]]], palette: Palette, title: str) -> Figure:
    """Output tok/s against peak resident KV, a panel per group, each point labelled with its budget."""
    fig, axes = _figure(len(groups), title, cols=2)
    for ax, (name, rows) in zip(axes, groups):
        _key(ax, palette, rows)
        for r in rows:
            x, y = r.value("kv_peak_bytes") / MIB, r.value("output_throughput")
            ax.scatter([x], [y], color=colour(r), marker=palette.marker(r))
            if r.budgeted:
                ax.annotate(f"budget {r.budget:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(4, 3))
        if rows[0].kv_limit:
            ax.axvline(rows[0].kv_limit / MIB, color="grey", linestyle="--", label="KV memory limit")
        ax.set_xlabel("peak resident KV (MiB)")
        ax.set_ylabel("output throughput (tok/s)")
        ax.set_title(name, fontsize=9)
    return _finish(fig, axes)


@dataclass(frozen=True)
class Panel:
    """One panel against KV budget: `metric` of `rows` (times `scale`), one line per strategy."""

    title: str
    ylabel: str
    rows: list[Row]
    metric: str
    scale: float = 1.0
    line: tuple[float, str] | None = None  # (y, label) of a threshold to draw, e.g. the wins rule's quality bound


def budget_panels(panels: list[Panel], palette: Palette, title: str) -> Figure:
    """Panels against KV budget, one line per strategy; strategies that keep every token are the dashed reference
    line the others are measured against."""
    fig, axes = _figure(len(panels), title)
    for ax, panel in zip(axes, panels):
        lines: dict[str, list[Row]] = defaultdict(list)
        for r in panel.rows:
            if r.value(panel.metric) is not None and r.budget is not None:
                lines[r.series].append(r)
        for series, items in sorted(lines.items()):
            points = sorted((r.budget, r.value(panel.metric) * panel.scale) for r in items)
            if not items[0].budgeted:
                ax.axhline(points[0][1], color=colour(items[0]), linestyle="--", linewidth=1, markersize=5,
                           marker=palette.marker(items[0]), label=f"{series} (keeps every token)")
                continue
            ax.plot(*zip(*points), marker=palette.marker(items[0]), color=colour(items[0]), label=series)
        if panel.line:
            ax.axhline(panel.line[0], color="red", linestyle=":", label=panel.line[1])
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("KV budget (fraction of each request's context)")
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title, fontsize=9)
    return _finish(fig, axes)


SEARCH = [("ttft_p90_ms", "ttft_ms", "TTFT p90"), ("tpot_p90_ms", "tpot_ms", "TPOT p90")]


def capacity_search(rows: list[Row], palette: Palette, title: str) -> Figure:
    """The capacity search's probes: rate against TTFT and TPOT p90 with the SLO; hollow = probe missed the SLO."""
    fig, axes = _figure(len(SEARCH), title, cols=2)
    for ax, (key, slo_key, name) in zip(axes, SEARCH):
        for r in rows:
            probes = sorted(r.m.info.get("capacity_probes", []), key=lambda p: p["rate"])
            xs, ys = [p["rate"] for p in probes], [p[key] for p in probes]
            ax.plot(xs, ys, color=colour(r), linestyle=palette.style(r), label=r.label)
            for p in probes:
                ax.scatter([p["rate"]], [p[key]], marker=palette.marker(r), edgecolors=colour(r),
                           facecolors=colour(r) if p["meets_slo"] else "none", zorder=3)
        slo = rows[0].m.config.get("slo", {}).get(slo_key)
        if slo is not None:
            ax.axhline(slo, color="red", linestyle=":", label=f"SLO ({name} {slo:g} ms)")
        ax.set_xlabel("probed request rate (req/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(f"{name} per probe (hollow: missed the SLO)", fontsize=9)
    return _finish(fig, axes)


def pareto(groups: list[tuple[str, list[tuple[Row, float | None, bool]]]], palette: Palette, title: str) -> Figure:
    """Throughput against KV peak, each point labelled with its perplexity ratio; Pareto-optimal points are large
    and ringed in black; hollow points have no quality measurement."""
    fig, axes = _figure(len(groups), title, cols=2)
    for ax, (name, points) in zip(axes, groups):
        _key(ax, palette, [r for r, _, _ in points])
        ax.scatter([], [], s=90, facecolors="white", edgecolors="black", linewidths=2, label="Pareto-optimal")
        ax.scatter([], [], facecolors="white", edgecolors="grey", label="no quality measurement")
        for r, ppl, optimal in points:
            x, y = r.value("kv_peak_bytes") / MIB, r.value("output_throughput")
            ax.scatter([x], [y], marker=palette.marker(r), s=90 if optimal else 40, zorder=3,
                       facecolors=colour(r) if ppl is not None else "none",
                       edgecolors="black" if optimal else colour(r), linewidths=2 if optimal else 1)
            ax.annotate("ppl ?" if ppl is None else f"ppl {ppl:.2f}", (x, y), fontsize=7, textcoords="offset points",
                        xytext=(5, 4))
        ax.set_xlabel("peak resident KV (MiB)")
        ax.set_ylabel("output throughput (tok/s)")
        ax.set_title(name, fontsize=9)
    return _finish(fig, axes)


def traffic(groups: list[tuple[str, list[Row]]], title: str) -> Figure:
    """KV bytes copied device -> host (solid) and host -> device (hatched) per strategy label, each non-zero bar
    labelled with its MiB so small transfers stay readable beside large ones."""
    fig, axes = _figure(len(groups), title, cols=2)
    for ax, (name, rows) in zip(axes, groups):
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((0, 0), 0, 0, facecolor="grey", label="device -> host"))
        ax.add_patch(Rectangle((0, 0), 0, 0, facecolor="grey", hatch="//", edgecolor="white", label="host -> device"))
        for i, r in enumerate(rows):
            for offset, metric, hatch in ((-0.2, "kv_bytes_to_host", None), (0.2, "kv_bytes_to_device", "//")):
                mib = (r.value(metric) or 0) / MIB
                ax.barh(i + offset, mib, height=0.4, color=colour(r), hatch=hatch, edgecolor="white")
                if mib:
                    ax.annotate(f"{mib:.3g}", (mib, i + offset), fontsize=7, va="center", xytext=(3, 0),
                                textcoords="offset points")
        ax.set_yticks(range(len(rows)), [r.label for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("KV copied in one round (MiB)")
        ax.set_title(name, fontsize=9)
    return _finish(fig, axes)
