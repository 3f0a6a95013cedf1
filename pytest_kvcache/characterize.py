"""`kvbench report`: the characterization study as one self-contained HTML page (plots inlined) and its markdown
twin (plots beside it), built from one list of blocks so both say the same; written into a new folder atomically."""

from __future__ import annotations

import base64
import html
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from pytest_kvcache import plots
from pytest_kvcache.claims import Claim, claims, rate_text
from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.models import get_spec
from pytest_kvcache.results import Results
from pytest_kvcache.study import MIB, Row, Study, grouped

PRODUCERS = {  # what produces each kind of data the page can show
    "test_load": "pytest suites/test_characterization.py -k test_load",
    "test_memory": "pytest suites/test_memory.py",
    "test_budget": "pytest suites/test_characterization.py -k test_budget",
    "test_capacity": "pytest suites/test_characterization.py -k test_capacity",
    "test_quality": "pytest suites/test_quality.py -m quality",
    "test_retrieval": "pytest suites/test_retrieval.py -m quality",
}
COLUMNS = [("ttft_ms", "TTFT p50 ms"), ("ttft_p90_ms", "TTFT p90 ms"), ("tpot_ms", "TPOT p50 ms"),
           ("tpot_p90_ms", "TPOT p90 ms"), ("e2e_ms", "E2E p50 ms"), ("goodput", "goodput req/s"),
           ("output_throughput", "out tok/s"), ("capacity_rps", "capacity req/s"), ("kv_peak_bytes", "KV peak MiB"),
           ("kv_bytes_to_host", "to host MiB"), ("kv_bytes_to_device", "to device MiB"), ("preemptions", "preempt"),
           ("top1_agreement", "top-1 agr."), ("kl_divergence", "KL nats"), ("perplexity_ratio", "ppl ratio"),
           ("passkey_accuracy", "passkey"), ("needle_accuracy", "needle"), ("multikey_accuracy", "multi-key"),
           ("vartrack_accuracy", "var. tracking")]
IN_MIB = ("kv_peak_bytes", "kv_bytes_to_host", "kv_bytes_to_device")
QUALITY = [("kl_divergence", "KL(full || strategy) (nats)"), ("perplexity_ratio", "perplexity / full"),
           ("top1_agreement", "teacher-forced top-1 agreement")]
RETRIEVAL = [("passkey_accuracy", "passkey"), ("needle_accuracy", "single needle"),
             ("multikey_accuracy", "multi-key needle"), ("vartrack_accuracy", "variable tracking")]
CSS = """body{font-family:system-ui,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f0f0f0}tr:nth-child(even) td{background:#fafafa}
img{max-width:100%}figure{margin:1em 0 2em}figcaption,.source{color:#555;font-size:13px}
code{background:#f3f3f3;padding:0 3px}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}"""


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    """A paragraph; `code` spans are kept in markdown and become <code> in HTML."""

    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]
    source: str


@dataclass(frozen=True)
class Image:
    name: str
    title: str
    png: bytes
    source: str


Block = Heading | Text | Bullets | Table | Image


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _tests(rows: list[Row]) -> str:
    """`suite::test` of the rows, each once: where a table's or figure's numbers came from."""
    return ", ".join(sorted({f"{r.m.suite}::{r.test}" for r in rows}))


def _missing(what: str, suite: str) -> Text:
    return Text(f"Not in the data: {what}. `{PRODUCERS[suite]}` measures it.")


def _limit(row: Row) -> str:
    return f"KV limit {row.kv_limit / MIB:.2f} MiB" if row.kv_limit else "no KV limit"


def _machine(results: Results) -> str:
    m = results.machine
    parts = [m.get("gpu"), m.get("cpu"), f"{m.get('cores')} cores" if m.get("cores") else None,
             f"{m.get('memory_gib')} GiB" if m.get("memory_gib") else None, f"torch {m.get('torch')}",
             f"transformers {m.get('transformers')}", f"CUDA {m['cuda']}" if m.get("cuda") else None]
    return f"{results.machine_id}: " + ", ".join(p for p in parts if p)


def header(study: Study) -> list[Block]:
    served = [r for r in study.rows if r.device]
    devices = sorted({f"{r.device} ({r.dtype})" for r in served})
    models = sorted({str(r.model) for r in study.rows})
    return [
        Heading("KV-cache characterization study", 1),
        Text("Built by `kvbench report` from the results files listed here. Each number is one measurement's "
             "median over its rounds (memory: the worst round); every table and figure names the suite and test "
             "it came from, and the last section lists every measurement with its file."),
        Bullets([f"Devices (dtype): {', '.join(devices) or 'not recorded'}",
                 "Models: " + "; ".join(f"{m} ({get_spec(m).description})" for m in models),
                 "Machines: " + "; ".join(sorted({_machine(results) for _, results in study.sources}))]
                + [f"[{i}] `{path}`: {results.created}, {results.machine_id}, "
                   f"{sum(1 for r in study.rows if r.source == path)} measurements"
                   for i, (path, results) in enumerate(study.sources, 1)]),
    ]


def wins_section(study: Study) -> list[Block]:
    blocks: list[Block] = [Heading("Which strategy wins where"), Text(f"Rule: {study.rule.text}")]
    if not study.wins:
        return blocks + [_missing("load conditions with two or more strategies", "test_load")]
    rows = []
    for w in study.wins:
        r, best = w.first, w.winner
        rows.append([r.device, r.model, r.arrival, rate_text(r.rate), best.label if best else "none",
                     _fmt(best.value("goodput")) if best else "-", _fmt(best.value("e2e_ms")) if best else "-",
                     w.reason, ", ".join(f"{x.label} (ppl {ppl:.2f})" for x, ppl in w.excluded) or "-",
                     ", ".join(x.label for x in w.unrated) or "-"])
    headers = ["device", "model", "arrival", "rate", "winner", "goodput req/s", "E2E p50 ms", "why",
               "excluded by quality", "quality not measured"]
    return blocks + [Table(headers, rows, _tests([x for w in study.wins for x in w.rows]))]


def claims_section(found: list[Claim]) -> list[Block]:
    blocks: list[Block] = [Heading("The study's claims against the measurements"),
                           Table(["claim", "verdict"], [[f"{c.key}: {c.text}", c.verdict] for c in found],
                                 "computed from the tables of this page by pytest_kvcache/claims.py")]
    for c in found:
        blocks += [Heading(f"{c.key}: {c.text}", 3),
                   Bullets([f"Question: {c.question}", f"Verdict: {c.verdict}", f"Deciding figure: {c.figure}",
                            f"Caveat: {c.caveat}"])]
    return blocks


def _image(images: list[Image], name: str, title: str, fig, source: str) -> Image:
    """The figure as a PNG named after what it shows (`test_memory-kv_peak_bytes.png`), kept in `images`."""
    stem = re.sub(r"[^A-Za-z0-9_.=-]+", "-", name)
    taken = {i.name for i in images}
    file, n = f"{stem}.png", 1
    while file in taken:
        n += 1
        file = f"{stem}-{n}.png"
    image = Image(file, title, plots.png(fig), source)
    images.append(image)
    return image


def latency_section(study: Study, palette: plots.Palette, images: list[Image]) -> list[Block]:
    blocks: list[Block] = [Heading("Latency against request rate")]
    if not study.sweeps:
        return blocks + [_missing("load measurements of one workload at several request rates", "test_load")]
    blocks.append(Text("TTFT and TPOT, median (p50) and p90 over each round's requests, against the trace's request "
                       "rate; 'all at t=0' is rate inf, every request arriving at once."))
    for (device, model, arrival, workload), rows in study.sweeps:
        title = f"Latency vs request rate: {model}, {device}, {arrival} arrivals, {workload}"
        blocks.append(_image(images, f"latency-{model}-{device}-{arrival}", title,
                             plots.latency_vs_rate(rows, palette, title), _tests(rows)))
    return blocks


def throughput_section(study: Study, palette: plots.Palette, images: list[Image]) -> list[Block]:
    blocks: list[Block] = [Heading("Throughput against KV memory")]
    groups = [(f"{test}: {model}, {device}, {_limit(rows[0])}", rows) for (test, device, model, _), rows in
              grouped(study.budget, lambda r: (r.test, r.device, r.model, r.kv_limit))]
    if not groups:
        return blocks + [_missing("measurements under a KV memory limit", "test_budget")]
    title = "Output throughput vs peak resident KV (all requests at t=0, under a KV memory limit)"
    return blocks + [_image(images, "throughput-kv_peak_bytes", title,
                            plots.throughput_vs_memory(groups, palette, title), _tests(study.budget))]


def memory_section(study: Study, palette: plots.Palette, images: list[Image]) -> list[Block]:
    blocks: list[Block] = [Heading("KV memory against budget")]
    rows = [r for r in study.suite("test_memory") if r.value("kv_peak_bytes") is not None]
    if not rows:
        return blocks + [_missing("peak KV memory per budget", "test_memory")]
    panels = [plots.Panel(f"{model}, {device}", "peak resident KV (MiB)", items, "kv_peak_bytes", 1 / MIB)
              for (device, model), items in grouped(rows, lambda r: (r.device, r.model))]
    title = "Peak resident KV vs KV budget (exact, from each strategy's accounting)"
    return blocks + [_image(images, "test_memory-kv_peak_bytes", title, plots.budget_panels(panels, palette, title),
                            _tests(rows))]


def capacity_section(study: Study, palette: plots.Palette, images: list[Image]) -> list[Block]:
    blocks: list[Block] = [Heading("Capacity under the SLO")]
    if not study.capacity:
        return blocks + [_missing("capacity searches (`capacity_rps`)", "test_capacity")]
    groups = grouped(study.capacity, lambda r: (r.device, r.model, r.kv_limit))
    slo = study.capacity[0].m.config.get("slo", {})
    blocks.append(Text(f"Capacity: the highest request rate whose TTFT p90 and TPOT p90 meet the SLO (TTFT "
                       f"{slo.get('ttft_ms')} ms, TPOT {slo.get('tpot_ms')} ms), one search per strategy; '>=' marks "
                       "a search whose highest rate still met the SLO (a lower bound), 0 one whose lowest rate did not."))
    panels = [plots.Panel(f"{model}, {device}, {_limit(rows[0])}", "capacity under the SLO (req/s)", rows,
                          "capacity_rps") for (device, model, _), rows in groups]
    title = "Capacity vs KV budget"
    blocks.append(_image(images, "capacity_rps", title, plots.budget_panels(panels, palette, title),
                         _tests(study.capacity)))
    rows = groups[0][1]
    shown = sorted(rows, key=lambda r: -r.value("capacity_rps"))[:3]
    shown += [r for r in rows if r.kind == "full" and r not in shown][:1]
    title = f"Capacity search: {panels[0].title}"
    blocks.append(_image(images, "capacity-search", title, plots.capacity_search(shown, palette, title),
                         _tests(shown)))
    table = [[r.model, _limit(r), r.label, _fmt(r.budget),
              (">= " if r.m.info.get("capacity_censored") else "") + _fmt(r.value("capacity_rps"))]
             for r in study.capacity]
    return blocks + [Table(["model", "KV limit", "strategy", "budget", "capacity req/s"], table,
                           _tests(study.capacity))]


def quality_section(study: Study, palette: plots.Palette, images: list[Image]) -> list[Block]:
    blocks: list[Block] = [Heading("Quality against KV budget")]
    scored = study.suite("test_quality")
    if scored:
        bound = (study.rule.max_perplexity_ratio, f"wins-rule bound ({study.rule.max_perplexity_ratio:.2f})")
        panels = [plots.Panel(name, name, scored, metric, line=bound if metric == "perplexity_ratio" else None)
                  for metric, name in QUALITY if any(r.value(metric) is not None for r in scored)]
        title = f"Quality vs KV budget ({', '.join(study.models(scored))}, teacher-forced against the full cache)"
        blocks.append(_image(images, "test_quality", title, plots.budget_panels(panels, palette, title),
                             _tests(scored)))
    else:
        blocks.append(_missing("quality measurements", "test_quality"))
    retrieved = study.suite("test_retrieval")
    if not retrieved:
        return blocks + [_missing("retrieval accuracies", "test_retrieval")]
    for (length,), rows in grouped(retrieved, lambda r: (r.m.config.get("length"),)):
        panels = [plots.Panel(name, f"{name} accuracy", rows, metric) for metric, name in RETRIEVAL
                  if any(r.value(metric) is not None for r in rows)]
        title = f"Retrieval accuracy vs KV budget ({', '.join(study.models(rows))}, {length}-token prompts)"
        blocks.append(_image(images, f"test_retrieval-{length}", title, plots.budget_panels(panels, palette, title),
                             _tests(rows)))
    return blocks


def pareto_section(study: Study, palette: plots.Palette, images: list[Image]) -> list[Block]:
    blocks: list[Block] = [Heading("Quality x throughput x memory: the Pareto front")]
    if not study.budget:
        return blocks + [_missing("throughput and KV peak under a KV memory limit", "test_budget")]
    scored = study.suite("test_quality")
    if not scored:
        return blocks + [_missing("perplexity ratios to place the strategies on the quality axis", "test_quality")]
    blocks.append(Text(f"Throughput and KV peak from {_tests(study.budget)} on {', '.join(study.models(study.budget))}"
                       f"; perplexity ratio from test_quality on {', '.join(study.models(scored))}, joined on the "
                       "strategy label (track_recall, which only changes what is recorded, is ignored). A point is "
                       "Pareto-optimal when no other point of its panel has at least its throughput, at most its "
                       "KV peak and at most its perplexity ratio, and is better in one; points with no quality "
                       "measurement (ppl ?) are never optimal."))
    groups, table = [], []
    for (test, device, model, _), rows in grouped(study.budget, lambda r: (r.test, r.device, r.model, r.kv_limit)):
        name = f"{test}: {model}, {device}, {_limit(rows[0])}"
        points = study.pareto(rows)
        groups.append((name, points))
        table += [[name, r.label, _fmt(r.value("kv_peak_bytes") / MIB), _fmt(r.value("output_throughput")),
                   _fmt(ppl), "yes" if optimal else "no"] for r, ppl, optimal in points]
    title = "Throughput vs KV peak, labelled with perplexity ratio"
    return blocks + [_image(images, "pareto", title, plots.pareto(groups, palette, title), _tests(study.budget)),
                     Table(["setting", "strategy", "KV peak MiB", "out tok/s", "ppl ratio", "Pareto-optimal"],
                           table, f"{_tests(study.budget)}; test_quality::test_quality")]


def traffic_section(study: Study, images: list[Image]) -> list[Block]:
    blocks: list[Block] = [Heading("Host <-> device KV traffic")]
    lowest = {}  # the load study at each model's lowest rate under Poisson arrivals: one bar per strategy
    for r in study.load:
        if r.arrival == "poisson" and r.study == "load":
            lowest[(r.device, r.model)] = min(r.rate, lowest.get((r.device, r.model), math.inf))
    load = [r for r in study.load if r.study == "load" and r.arrival == "poisson"
            and r.rate == lowest[(r.device, r.model)]]
    rows = [r for r in study.budget + load if r.value("kv_bytes_to_host") is not None]
    if not rows:
        return blocks + [_missing("KV copy counters under a KV memory limit", "test_budget")]
    movers = sorted({r.label for r in rows if r.value("kv_bytes_to_host") or r.value("kv_bytes_to_device")})
    blocks.append(Text(f"Exact KV byte counters of one round, under a KV memory limit (test_budget) and in the load "
                       f"study at its lowest Poisson rate (test_load); strategies that moved bytes: "
                       f"{', '.join(movers) or 'none'}."))
    groups = [(f"{test}: {model}, {device}, " + (_limit(items[0]) if items[0].kv_limit else f"{items[0].rate:g} req/s"),
               items) for (test, device, model, _), items in
              grouped(rows, lambda r: (r.test, r.device, r.model, r.kv_limit))]
    title = "KV bytes copied between host and device"
    return blocks + [_image(images, "kv_bytes_to_host-to_device", title, plots.traffic(groups, title), _tests(rows))]


def appendix(study: Study) -> list[Block]:
    blocks: list[Block] = [Heading("Every measurement"), Text("File numbers refer to the results files listed at "
                                                              "the top. Memory and byte counters in MiB.")]
    index = {path: i for i, (path, _) in enumerate(study.sources, 1)}
    for (suite, kind), rows in grouped(study.rows, lambda r: (r.m.suite, r.study or "")):
        columns = [(metric, title) for metric, title in COLUMNS if any(r.value(metric) is not None for r in rows)]
        table = [[f"[{index[r.source]}]", r.m.test_id] + [
            _fmt(r.value(metric) / MIB if metric in IN_MIB and r.value(metric) is not None else r.value(metric))
            for metric, _ in columns] for r in rows]
        blocks += [Heading(f"{suite}" + (f" (study {kind})" if kind else ""), 3),
                   Table(["file", "test"] + [title for _, title in columns], table, suite)]
    return blocks


def page(study: Study) -> tuple[list[Block], list[Image]]:
    """Every block of the page, in order, and the images among them."""
    palette = plots.Palette.of(study.rows)
    images: list[Image] = []
    blocks = (header(study) + wins_section(study) + claims_section(claims(study))
              + latency_section(study, palette, images) + memory_section(study, palette, images)
              + throughput_section(study, palette, images)
              + capacity_section(study, palette, images) + quality_section(study, palette, images)
              + pareto_section(study, palette, images) + traffic_section(study, images) + appendix(study))
    return blocks, images


def markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Text):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            out += [f"Source: {b.source}", tabulate(b.rows, headers=b.headers, tablefmt="github",
                                                    disable_numparse=True)]
        else:
            out += [f"![{b.title}]({b.name})", f"*{b.title}. Source: {b.source}*"]
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def to_html(blocks: list[Block]) -> str:
    title = next(b.text for b in blocks if isinstance(b, Heading))
    out = [(f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body>")]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            out.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in b.items) + "</ul>")
        elif isinstance(b, Table):
            out += [f"<p class=\"source\">Source: {_inline(b.source)}</p>",
                    tabulate(b.rows, headers=b.headers, tablefmt="html", disable_numparse=True)]
        else:
            data = base64.b64encode(b.png).decode()
            out.append(f"<figure><img alt=\"{html.escape(b.title)}\" src=\"data:image/png;base64,{data}\">"
                       f"<figcaption>{_inline(b.title)}. Source: {_inline(b.source)}</figcaption></figure>")
    return "\n".join(out + ["</body></html>"]) + "\n"


def check_output(out: Path, force: bool) -> None:
    """Refuse a file, or a non-empty folder unless forced, before anything is computed or written."""
    if out.exists() and not out.is_dir():
        raise KVConfigError(f"{out} is a file, not a folder: choose another -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise KVConfigError(f"{out} exists and is not empty: pass --force to replace it, or choose another -o")


def write_report(sources: list[tuple[str, Results]], out: Path, force: bool = False) -> Path:
    """out/index.html and out/README.md with the PNGs beside it, built in a temporary folder next to `out` and
    renamed into place, so `out` is either the old report or the whole new one; returns the HTML path."""
    check_output(out, force)
    study = Study(sources)
    if not study.rows:
        raise KVConfigError(f"nothing to report: {', '.join(p for p, _ in sources)} hold no measurements")
    blocks, images = page(study)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for image in images:
            (staging / image.name).write_bytes(image.png)
        (staging / "README.md").write_text(markdown(blocks))
        (staging / "index.html").write_text(to_html(blocks))
        staging.chmod(0o755)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / "index.html"
