"""kvbench report: the wins rule (winner, ties, exclusion by quality), each claim's three verdicts, the Pareto front,
the self-contained HTML page and its markdown twin, stable strategy colours, and the CLI's refusals and exit codes,
all on synthetic measurements in the characterization suite's layout."""

import json
import math
import re

import pytest
from matplotlib.colors import to_rgb

from pytest_kvcache import cli, plots
from pytest_kvcache.characterize import Text, markdown, page, to_html, traffic_section, write_report
from pytest_kvcache.claims import CONTRADICTED, NOT_MEASURABLE, SUPPORTED, claims
from pytest_kvcache.results import Measurement, Outcome, Results
from pytest_kvcache.strategies.base import STRATEGIES
from pytest_kvcache.study import RULE, Row, Study

MACHINE = {"machine_id": "cpu-x86_64", "cpu": "test cpu", "cores": 2, "memory_gib": 8, "torch": "2.13.0+cpu"}
SLO = {"ttft_ms": 2000.0, "tpot_ms": 200.0}
LIMIT = 3 * 2**20


def _config(strategy: str, study: str, model: str, rate: float, **extra) -> dict:
    bursty = extra.get("arrival") == "bursty"
    spec = {"rate": "inf" if math.isinf(rate) else rate, "burstiness": 0.25 if bursty else 1.0,
            "range_ratio": 0.75 if bursty else 0.25, "prompt_len": 128, "output_len": 32, "num_requests": 16}
    trace = {"spec": spec, "sha256": f"{model}-{extra.get('arrival')}-{rate}"}
    return {"engine": "HFEngine", "device": "cpu", "model": model, "dtype": "float32", "strategy": strategy,
            "study": study, "trace": trace, "kv_limit_bytes": None, "slo": SLO, **extra}


def load(strategy, goodput, e2e=100.0, rate=8.0, model="tiny", arrival="poisson"):
    """A test_load measurement of one strategy at one rate."""
    metrics = {"goodput": [goodput], "e2e_ms": [e2e], "ttft_ms": [e2e / 4], "ttft_p90_ms": [e2e / 2],
               "tpot_ms": [e2e / 40], "tpot_p90_ms": [e2e / 30], "output_throughput": [goodput * 32]}
    config = _config(strategy, "load", model, rate, arrival=arrival)
    return Measurement(f"test_load[{model}-{strategy}-{arrival}-{rate}]", "test_characterization", config, metrics,
                       0.01, MACHINE)


def budget(strategy, throughput, kv_mib, to_host=0, to_device=0, model="tiny"):
    """A test_budget measurement: rate inf under a KV memory limit."""
    metrics = {"output_throughput": [throughput], "kv_peak_bytes": [kv_mib * 2**20], "kv_bytes_to_host": [to_host],
               "kv_bytes_to_device": [to_device], "goodput": [1.0], "e2e_ms": [100.0]}
    config = _config(strategy, "budget", model, math.inf, kv_limit_bytes=LIMIT)
    return Measurement(f"test_budget[{model}-{strategy}]", "test_characterization", config, metrics, 0.01, MACHINE)


def capacity(strategy, rps, model="tiny"):
    """A test_capacity measurement with its search probes."""
    probes = [{"rate": r, "ttft_p90_ms": 100.0 * r, "tpot_p90_ms": 10.0 * r, "meets_slo": r <= rps}
              for r in (1.0, 2.0, 4.0, 8.0)]
    config = _config(strategy, "capacity", model, 1.0, kv_limit_bytes=LIMIT)
    return Measurement(f"test_capacity[{model}-{strategy}]", "test_characterization", config,
                       {"capacity_rps": [rps]}, 0.01, MACHINE, {"capacity_probes": probes})


def quality(strategy, ppl):
    """A test_quality measurement on SmolLM2."""
    metrics = {"perplexity_ratio": [ppl], "kl_divergence": [ppl - 1], "top1_agreement": [2 - ppl]}
    return Measurement(f"test_quality[smollm2-{strategy}]", "test_quality", {"model": "smollm2", "strategy": strategy},
                       metrics, None)


def study(*measurements, path="results.json"):
    results = Results("2026-12-01T00:00:00+00:00", MACHINE, "cpu-x86_64", {},
                      [Outcome(f"suites/x.py::{m.test_id}", m, []) for m in measurements])
    return Study([(path, results)])


def results_file(tmp_path, *measurements, name="results.json"):
    path = tmp_path / name
    path.write_text(json.dumps(study(*measurements).sources[0][1].to_json()))
    return path


def test_wins_rule_highest_goodput_wins():
    """The strategy with the highest goodput wins its condition; conditions are kept apart by rate."""
    wins = study(load("full", 10.0), load("h2o:budget=0.5", 12.0, e2e=150.0),
                 load("full", 20.0, rate=16.0), load("h2o:budget=0.5", 5.0, rate=16.0)).wins
    assert [(w.first.rate, w.winner.label) for w in wins] == [(8.0, "h2o:budget=0.5"), (16.0, "full")]
    assert wins[0].reason == "goodput 12 vs 10 req/s (full)"


def test_wins_rule_ties_within_five_percent_go_to_the_lower_e2e():
    """Goodputs within the rule's 5% tie and the lower median E2E latency wins; 10% apart is no tie."""
    tied = study(load("full", 10.0, e2e=100.0), load("h2o:budget=0.5", 10.4, e2e=150.0)).wins[0]
    assert tied.winner.label == "full" and "lowest E2E p50 wins" in tied.reason
    apart = study(load("full", 10.0, e2e=100.0), load("h2o:budget=0.5", 11.0, e2e=150.0)).wins[0]
    assert apart.winner.label == "h2o:budget=0.5"
    assert RULE.tie == 0.05 and "within 5% of the highest goodput tie" in RULE.text


def test_wins_rule_excludes_strategies_above_the_quality_bound():
    """A strategy whose perplexity ratio is above 1.10 is excluded even with the best goodput; the quality join
    ignores track_recall; a strategy without quality data competes and is marked; full counts as exact."""
    s = study(load("full", 10.0), load("infinigen:budget=0.5,track_recall=0", 20.0),
              load("streaming:budget=0.5", 11.0), quality("infinigen:budget=0.5", 1.3))
    w = s.wins[0]
    assert w.winner.label == "streaming:budget=0.5"
    assert [(r.label, ppl) for r, ppl in w.excluded] == [("infinigen:budget=0.5,track_recall=0", 1.3)]
    assert [r.label for r in w.unrated] == ["streaming:budget=0.5"]
    assert s.perplexity(w.rows[0]) == 1.0


def test_conditions_with_one_strategy_have_no_winner():
    assert study(load("full", 10.0), load("full", 20.0, rate=16.0)).wins == []


def _verdict(*measurements, key):
    found = {c.key: c for c in claims(study(*measurements))}[key]
    return found.verdict, found.figure, found.caveat


def test_c1_vllm_at_the_largest_model_and_lowest_rate():
    """C1 reads only the largest model's lowest finite rate; it needs vLLM there and a model of 1B or more."""
    won = [load("vllm", 2.0, rate=1.0, model="llama-8b"), load("full", 1.5, rate=1.0, model="llama-8b"),
           load("vllm", 5.0, rate=16.0, model="llama-8b"), load("full", 9.0, rate=16.0, model="llama-8b")]
    verdict, figure, caveat = _verdict(*won, load("full", 9.0, model="tiny"), load("vllm", 1.0, model="tiny"),
                                       key="C1")
    assert verdict == SUPPORTED and figure.startswith("vLLM wins 1 of 1: llama-8b, poisson, 1 req/s: winner vllm")
    assert "llama-8b: Llama-3.1-8B shape, random weights" in caveat and "cpu float32" in caveat
    lost = [load("vllm", 1.0, rate=1.0, model="llama-8b"), load("full", 1.5, rate=1.0, model="llama-8b")]
    assert _verdict(*lost, key="C1")[0] == CONTRADICTED
    without = [load("full", 1.5, rate=1.0, model="llama-8b"), load("h2o:budget=0.5", 1.0, rate=1.0, model="llama-8b"),
               load("vllm", 9.0, model="tiny"), load("full", 1.0, model="tiny")]
    verdict, figure, _ = _verdict(*without, key="C1")
    assert verdict == NOT_MEASURABLE and figure.startswith("no vLLM measurement at llama-8b, 1 req/s")
    verdict, figure, caveat = _verdict(load("vllm", 9.0, model="tiny"), load("full", 1.0, model="tiny"), key="C1")
    assert verdict == NOT_MEASURABLE and figure.startswith("vLLM wins 1 of 1")
    assert caveat.startswith("the largest model here, tiny, has 1M parameters, below the 1B")


def _bursty(infinigen_wins: int, conditions: int = 3):
    rows = []
    for i in range(conditions):
        rate = 2.0 ** i
        rows += [load("infinigen:budget=0.5", 10.0 if i < infinigen_wins else 5.0, rate=rate, arrival="bursty"),
                 load("full", 8.0, rate=rate, arrival="bursty")]
    return rows


def test_c2_infinigen_under_bursty_arrivals():
    """C2 counts the bursty conditions infinigen wins: supported above half, contradicted otherwise."""
    verdict, figure, caveat = _verdict(*_bursty(2), key="C2")
    assert verdict == SUPPORTED
    assert figure.startswith("infinigen wins 2 of 3 bursty conditions (winners: infinigen:budget=0.5 x2, full x1)")
    assert "burstiness 0.25 with prompt lengths within +-75%" in caveat and "on CPU" in caveat
    assert _verdict(*_bursty(1), key="C2")[0] == CONTRADICTED
    assert _verdict(load("full", 1.0), load("infinigen:budget=0.5", 2.0), key="C2")[:2] == (
        NOT_MEASURABLE, "no bursty-arrival load conditions in the data")
    no_infinigen = [load("full", 1.0, arrival="bursty"), load("h2o:budget=0.5", 2.0, arrival="bursty")]
    assert _verdict(*no_infinigen, key="C2")[:2] == (NOT_MEASURABLE, "infinigen was not measured under bursty arrivals")


def test_c3_h2o_in_high_throughput_settings():
    """C3 asks whether h2o tops throughput (capacity) in each high-throughput setting, within the quality bound."""
    verdict, figure, _ = _verdict(budget("h2o:budget=0.2", 900.0, 1.0), budget("full", 500.0, 2.9),
                                  capacity("h2o:budget=0.2", 4.0), capacity("full", 2.0), key="C3")
    assert verdict == SUPPORTED and figure.startswith("h2o tops 2 of 2 settings: test_budget tiny cpu, KV limit 3.00 MiB")
    verdict, figure, _ = _verdict(budget("h2o:budget=0.2", 900.0, 1.0), budget("quantized", 950.0, 1.5), key="C3")
    assert verdict == CONTRADICTED and "top quantized (quality not measured) 950 tok/s, best h2o h2o:budget=0.2 900" \
        in figure
    excluded = [budget("h2o:budget=0.1", 990.0, 0.5), budget("full", 500.0, 2.9), quality("h2o:budget=0.1", 1.5)]
    assert "best h2o h2o excluded by quality" in _verdict(*excluded, key="C3")[1]
    assert _verdict(budget("full", 500.0, 2.9), budget("quantized", 900.0, 1.0), key="C3")[0] == NOT_MEASURABLE


def test_pareto_front_on_throughput_memory_and_quality():
    """Optimal = no point with known quality at least as fast, as small and as good; unknown quality never is."""
    s = study(budget("full", 100.0, 2.0), budget("paged", 90.0, 2.0), budget("h2o:budget=0.2", 200.0, 1.0),
              budget("streaming:budget=0.2", 300.0, 0.5), budget("h2o:budget=0.5", 150.0, 1.5),
              quality("h2o:budget=0.2", 1.2), quality("h2o:budget=0.5", 1.25))
    front = {r.label: (ppl, optimal) for r, ppl, optimal in s.pareto(s.budget)}
    assert front == {"full": (1.0, True), "paged": (1.0, False), "h2o:budget=0.2": (1.2, True),
                     "streaming:budget=0.2": (None, False), "h2o:budget=0.5": (1.25, False)}


def test_colours_fixed_per_strategy_in_every_plot():
    """Each registered strategy has its own colour; a strategy keeps its colour across figures and budgets."""
    assert set(STRATEGIES) <= set(plots.COLOURS)
    assert len(set(plots.COLOURS.values())) == len(plots.COLOURS)
    rows = [Row("r", m) for m in (budget("h2o:budget=0.2", 900.0, 1.0), budget("h2o:budget=0.5", 700.0, 2.0),
                                  budget("paged", 500.0, 2.9), budget("paged:preempt=swap", 400.0, 2.9))]
    loads = [Row("r", m) for m in (load("h2o:budget=0.5", 5.0), load("h2o:budget=0.5", 6.0, rate=math.inf))]
    palette = plots.Palette.of(rows + loads)
    assert plots.Palette.of(list(reversed(rows + loads))) == palette
    memory = plots.throughput_vs_memory([("g", rows)], palette, "t")
    latency = plots.latency_vs_rate(loads, palette, "t")
    drawn = [tuple(c.get_facecolor()[0][:3]) for c in memory.axes[0].collections if len(c.get_offsets())]
    line, apart = latency.axes[0].lines
    assert drawn[:2] == [to_rgb(plots.COLOURS["h2o"])] * 2 and drawn[2] != drawn[3]
    assert line.get_color() == apart.get_color() == plots.COLOURS["h2o"]
    assert plots.colour(rows[3]) == plots.COLOURS["paged:preempt=swap"] != plots.colour(rows[2])
    ticks = [t.get_text() for t in latency.axes[0].get_xticklabels()]
    assert ticks == ["8", "all at\nt=0"] and apart.get_xdata()[0] > line.get_xdata()[-1]
    assert apart.get_linestyle() == "None"
    plots.png(memory), plots.png(latency)


def _full_study():
    return study(load("full", 10.0), load("h2o:budget=0.5", 12.0), load("full", 12.0, rate=16.0),
                 load("h2o:budget=0.5", 13.0, rate=16.0), budget("full", 500.0, 2.9),
                 budget("h2o:budget=0.2", 900.0, 1.0), budget("paged:preempt=swap", 450.0, 2.9, 2**20, 2**20),
                 quality("h2o:budget=0.2", 1.05), quality("h2o:budget=0.5", 1.01))


def test_html_is_self_contained_and_markdown_says_the_same():
    """index.html needs no other file (plots as data URIs, inline CSS); README.md has the same tables and plots."""
    blocks, images = page(_full_study())
    text, md = to_html(blocks), markdown(blocks)
    assert "data:image/png;base64," in text
    assert re.findall(r'src="(?!data:image/png;base64,)', text) == []
    assert "<link" not in text and "<script" not in text and "href=" not in text and "<style>" in text
    assert text.count("<img") == md.count("![") == len(images) >= 3
    assert text.count("<table>") == len(re.findall(r"^\|[-|]+\|$", md, re.MULTILINE))
    for image in images:
        assert f"]({image.name})" in md
    assert "h2o:budget=0.5" in md and "<td>h2o:budget=0.5</td>" in text
    assert RULE.text in md and RULE.text.replace("'", "&#x27;") in text


def test_missing_studies_say_which_command_measures_them(tmp_path):
    """With only quality data the page names the commands that produce the rest, and each claim is unmeasurable."""
    path = write_report(study(quality("h2o:budget=0.5", 1.01), quality("full", 1.0)).sources, tmp_path / "r")
    md = (path.parent / "README.md").read_text()
    for command in ("-k test_load", "-k test_budget", "-k test_capacity", "suites/test_retrieval.py -m quality"):
        assert command in md
    assert md.count(f"Verdict: {NOT_MEASURABLE}") == 3


def _report(tmp_path, capsys, *args):
    code = cli.main(["report", *args])
    return code, capsys.readouterr()


def test_cli_writes_the_page_and_refuses_to_overwrite(tmp_path, capsys):
    """A non-empty DIR is refused (exit 2, one line, untouched) unless --force; an empty one is used as is."""
    results = results_file(tmp_path, *[o.measurement for o in _full_study().sources[0][1].outcomes])
    out = tmp_path / "report"
    out.mkdir()
    code, _ = _report(tmp_path, capsys, str(results), "-o", str(out))
    assert code == 0 and {"index.html", "README.md"} <= {p.name for p in out.iterdir()}
    (out / "mine.txt").write_text("keep")
    before = sorted(p.name for p in out.iterdir())
    code, io = _report(tmp_path, capsys, str(results), "-o", str(out))
    assert code == 2 and io.err.count("\n") == 1 and "pass --force" in io.err
    assert sorted(p.name for p in out.iterdir()) == before
    code, io = _report(tmp_path, capsys, str(results), "-o", str(out), "--force")
    assert code == 0 and not (out / "mine.txt").exists() and (out / "index.html").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    """Missing or corrupt results, or a file as DIR: one line on stderr, exit 2, nothing written."""
    out = tmp_path / "report"
    corrupt = tmp_path / "bad.json"
    corrupt.write_text("{not json")
    for args in ([str(tmp_path / "missing.json")], [str(corrupt)]):
        code, io = _report(tmp_path, capsys, *args, "-o", str(out))
        assert code == 2 and io.err.startswith("kvbench: error: ") and io.err.count("\n") == 1
        assert not out.exists()
    results = results_file(tmp_path, load("full", 1.0))
    (tmp_path / "file").write_text("x")
    code, io = _report(tmp_path, capsys, str(results), "-o", str(tmp_path / "file"))
    assert code == 2 and "is a file, not a folder" in io.err


def test_cli_help_names_the_outputs_and_force(capsys):
    assert cli.main(["report", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "index.html" in text and "README.md" in text and "--force" in text and "RESULTS" in text


def test_traffic_includes_the_load_study_at_its_lowest_poisson_rate(monkeypatch):
    """InfiniGen moves its KV in the load study too: the traffic section reads it there (lowest Poisson rate only,
    one bar per strategy) beside the budget study, and names the strategies that moved bytes."""
    def moving(strategy, rate, to_device):
        m = load(strategy, 5.0, rate=rate)
        m.metrics.update(kv_bytes_to_host=[to_device / 8], kv_bytes_to_device=[to_device])
        return m

    rows = study(moving("full", 8.0, 0), moving("infinigen:budget=0.2", 8.0, 2**20),
                 moving("infinigen:budget=0.2", 32.0, 2**21), budget("full", 500.0, 1.0))
    drawn = []
    real = plots.traffic
    monkeypatch.setattr(plots, "traffic", lambda groups, title: drawn.extend(groups) or real(groups, title))
    images = []
    blocks = traffic_section(rows, images)
    (text,) = [b.text for b in blocks if isinstance(b, Text)]
    assert "strategies that moved bytes: infinigen:budget=0.2." in text
    assert [i.name for i in images] == ["kv_bytes_to_host-to_device.png"]
    by_test = {name.split(":")[0]: [(r.label, r.rate) for r in group] for name, group in drawn}
    assert by_test["test_load"] == [("full", 8.0), ("infinigen:budget=0.2", 8.0)]
    assert by_test["test_budget"] == [("full", math.inf)]
