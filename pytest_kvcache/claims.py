"""The study's three claims set against the measurements: each verdict computed by the wins rule, with the figure
that decides it and what the measurement cannot say."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from pytest_kvcache.metrics import MIB
from pytest_kvcache.study import Row, Study, Win, grouped

SUPPORTED, CONTRADICTED, NOT_MEASURABLE = "supported", "contradicted", "not measurable here"


@dataclass(frozen=True)
class Claim:
    """One claim, the question the code asks of the data, its verdict (SUPPORTED, CONTRADICTED or NOT_MEASURABLE),
    the deciding figure and a caveat."""

    key: str
    text: str
    question: str
    verdict: str
    figure: str
    caveat: str


CLAIMS = {  # key: (the claim as the study states it, the question the code asks of the data)
    "C1": ("vLLM does best with large models at low request rates",
           ("At the largest model in the load conditions and its lowest finite request rate, is a vLLM strategy "
            "the winner by the rule in more than half of the conditions there that measured vLLM? Not measurable "
            "without a vLLM measurement there, or when that model has fewer than {large:g}B parameters.")),
    "C2": ("InfiniGen does best with fluctuating request sizes",
           ("Under bursty arrivals (arrival=bursty: gamma arrivals with fluctuating prompt lengths), is infinigen "
            "the winner by the rule in more than half of the conditions that measured it?")),
    "C3": ("H2O does best in high-throughput settings",
           ("In the high-throughput settings (each KV memory limit of test_budget and test_throughput at rate inf, "
            "each test_capacity limit, and the highest load rate at which h2o ran), does h2o have the highest "
            "output throughput (capacity for test_capacity) among the strategies within the rule's quality bound, "
            "in more than half of the settings that measured it?")),
}
Verdict = tuple[str, str, str]  # (verdict, deciding figure, caveat)


def rate_text(rate: float) -> str:
    return "all at t=0" if math.isinf(rate) else f"{rate:g} req/s"


def parameters(model: str) -> int:
    """Parameter count of a model in the registry, from its shape."""
    import torch

    from pytest_kvcache.models import get_spec, parameter_bytes

    return parameter_bytes(get_spec(model).llama_config(), torch.float32) // 4


def measured_on(rows: list[Row]) -> str:
    """Device, dtype and model descriptions of the rows: what a verdict was measured on."""
    from pytest_kvcache.models import get_spec

    where = ", ".join(sorted({f"{r.device} {r.dtype}" for r in rows}))
    models = "; ".join(f"{m}: {get_spec(m).description}" for m in sorted({str(r.model) for r in rows}))
    return f"measured on {where} with {models}"


def _verdict(won: int, of: int) -> str:
    return SUPPORTED if 2 * won > of else CONTRADICTED


def _is_vllm(r: Row) -> bool:
    return r.strategy.engine == "vllm"


def _goodput(r: Row) -> str:
    return f"{r.label} ({r.value('goodput'):.3g} req/s)"


def _standing(w: Win, pick: Callable[[Row], bool], subject: str) -> str:
    """'tiny, poisson, 8 req/s: winner full (7.9 req/s), best vllm vllm (7.5 req/s)' for one condition."""
    r = w.first
    head = f"{r.model}, {r.arrival}, {rate_text(r.rate)}: "
    if w.winner is None:
        return head + w.reason
    text = f"{head}winner {_goodput(w.winner)}"
    if pick(w.winner):
        return text + (f", next {_goodput(w.ranked[1])}" if len(w.ranked) > 1 else "")
    mine = [x for x in w.ranked if pick(x)]
    return text + (f", best {subject} {_goodput(mine[0])}" if mine else f", {subject} excluded by quality")


def vllm_large_models_low_rates(study: Study) -> Verdict:
    """C1: at the largest model in the data and its lowest finite rate, is a vLLM strategy the rule's winner?"""
    if not study.wins:
        return (NOT_MEASURABLE, "no load conditions in the data",
                "run `pytest suites/test_characterization.py -k test_load` (with --gpu and vLLM for large models)")
    model = max({str(w.first.model) for w in study.wins}, key=parameters)
    finite = [w for w in study.wins if w.first.model == model and math.isfinite(w.first.rate)]
    if not finite:
        return (NOT_MEASURABLE, f"no finite request rate measured at {model}",
                measured_on([r for w in study.wins for r in w.rows]))
    low = min(w.first.rate for w in finite)
    at = [w for w in finite if w.first.rate == low and any(_is_vllm(r) for r in w.rows)]
    caveat = measured_on([r for w in finite for r in w.rows])
    if not at:
        return (NOT_MEASURABLE, (f"no vLLM measurement at {model}, {rate_text(low)} (the largest model and its "
                "lowest rate here)"), caveat)
    won = sum(1 for w in at if w.winner is not None and _is_vllm(w.winner))
    figure = f"vLLM wins {won} of {len(at)}: " + "; ".join(_standing(w, _is_vllm, "vLLM") for w in at)
    size = parameters(model)
    if size < study.rule.large_model_parameters:
        return (NOT_MEASURABLE, figure, (f"the largest model here, {model}, has {size / 1e6:.0f}M parameters, "
                f"below the {study.rule.large_model_parameters / 1e9:g}B this claim is about; {caveat}"))
    return _verdict(won, len(at)), figure, caveat


def infinigen_bursty(study: Study) -> Verdict:
    """C2: under bursty arrivals with fluctuating prompt lengths, does InfiniGen win most conditions?"""
    bursty = [w for w in study.wins if w.first.arrival == "bursty"]
    if not bursty:
        return (NOT_MEASURABLE, "no bursty-arrival load conditions in the data",
                "run `pytest suites/test_characterization.py -k test_load` (arrival=bursty)")
    measured = [w for w in bursty if w.measured("infinigen")]
    rows = [r for w in bursty for r in w.rows]
    spec = rows[0].m.config["trace"]["spec"]
    caveat = (f"bursty = gamma arrivals of burstiness {spec.get('burstiness')} with prompt lengths within "
              f"+-{spec.get('range_ratio', 0):.0%}; {measured_on(rows)}")
    if all(str(r.device) == "cpu" for r in rows):
        caveat += "; on CPU host and device memory are one, so InfiniGen's offload saves no transfer"
    if not measured:
        return (NOT_MEASURABLE, "infinigen was not measured under bursty arrivals", caveat)
    won = [w for w in measured if w.winner is not None and w.winner.kind == "infinigen"]
    winners = Counter(w.winner.label if w.winner else "none" for w in measured)
    poisson = [w for w in study.wins if w.first.arrival == "poisson" and w.measured("infinigen")]
    poisson_won = sum(1 for w in poisson if w.winner is not None and w.winner.kind == "infinigen")
    figure = (f"infinigen wins {len(won)} of {len(measured)} bursty conditions (winners: "
              f"{', '.join(f'{label} x{n}' for label, n in winners.most_common())}); under Poisson arrivals "
              f"{poisson_won} of {len(poisson)}")
    return _verdict(len(won), len(measured)), figure, caveat


def _throughput_settings(study: Study) -> list[tuple[str, list[Row], str, str]]:
    """(setting, rows, metric, unit) of every high-throughput setting: each KV memory limit of the budget study
    and of test_throughput (rate inf), each capacity search, and of each load arrival the highest rate h2o ran at."""
    settings = []
    for rows, metric, unit in ((study.budget, "output_throughput", "tok/s"), (study.capacity, "capacity_rps", "req/s")):
        for (test, device, model, limit), group in grouped(rows, lambda r: (r.test, r.device, r.model, r.kv_limit)):
            where = f"{test} {model} {device}" + (f", KV limit {limit / MIB:.2f} MiB" if limit else "")
            settings.append((where, group, metric, unit))
    top: dict[tuple, Win] = {}
    for w in (w for w in study.wins if w.measured("h2o")):
        key = (w.first.device, w.first.model, w.first.arrival)
        if key not in top or w.first.rate > top[key].first.rate:
            top[key] = w
    for (device, model, arrival), w in sorted(top.items(), key=str):
        settings.append((f"load {model} {device}, {arrival}, {rate_text(w.first.rate)}", list(w.rows),
                         "output_throughput", "tok/s"))
    return settings


def h2o_high_throughput(study: Study) -> Verdict:
    """C3: in high-throughput settings (rate inf under a KV memory limit, capacity, the highest load rate), does
    h2o reach the highest throughput (or capacity) among the strategies within the quality bound?"""
    found = []
    rows = []
    for where, group, metric, unit in _throughput_settings(study):
        if not any(r.kind == "h2o" for r in group):
            continue
        competing, _, _ = study.screen([r for r in group if r.value(metric) is not None])
        if not competing:
            continue
        best = max(competing, key=lambda r: r.value(metric))
        h2o = [r for r in competing if r.kind == "h2o"]
        mine = max(h2o, key=lambda r: r.value(metric)) if h2o else None
        shown = f"{mine.label} {mine.value(metric):.4g}" if mine else "h2o excluded by quality"
        if mine and mine is not best and mine.value(metric) >= (1 - study.rule.tie) * best.value(metric):
            shown += f" (within the rule's {study.rule.tie:.0%} tie)"
        unrated = " (quality not measured)" if study.perplexity(best) is None else ""
        found.append((best.kind == "h2o", f"{where}: top {best.label}{unrated} {best.value(metric):.4g} {unit}"
                      + ("" if best is mine else f", best h2o {shown}")))
        rows += group
    if not found:
        return (NOT_MEASURABLE, "h2o was not measured in a high-throughput setting",
                "run `pytest suites/test_characterization.py -k 'test_budget or test_capacity'`")
    won = sum(1 for top, _ in found if top)
    figure = f"h2o tops {won} of {len(found)} settings: " + "; ".join(line for _, line in found)
    caveat = (f"{measured_on(rows)}; strategies above the quality bound are left out; a KV memory limit favours "
              "strategies that keep fewer bytes per request")
    return _verdict(won, len(found)), figure, caveat


CHECKS = {"C1": vllm_large_models_low_rates, "C2": infinigen_bursty, "C3": h2o_high_throughput}


def claims(study: Study) -> list[Claim]:
    """Every claim with the verdict its check computes from the study."""
    large = study.rule.large_model_parameters / 1e9
    return [Claim(key, text, question.format(large=large), *CHECKS[key](study))
            for key, (text, question) in CLAIMS.items()]
