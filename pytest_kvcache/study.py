"""The characterization study computed from results files: measurements as rows, the rule that says which strategy
wins a load condition, and the quality x throughput x memory Pareto front. Nothing here draws or writes."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from pytest_kvcache.metrics import MIB
from pytest_kvcache.results import Measurement, Results
from pytest_kvcache.strategies import parse_strategy
from pytest_kvcache.strategies.base import KVStrategy

MEASUREMENT_ONLY = ("track_recall",)  # strategy parameters that change what is recorded, not what is kept


@dataclass(frozen=True)
class Rule:
    """Every constant the study's decisions use, in one place; `text` is the rule as the page states it."""

    tie: float = 0.05  # goodputs within this fraction of the best tie
    max_perplexity_ratio: float = 1.10  # quality bound: above it a strategy is excluded
    exact: tuple[str, ...] = ("full", "none", "paged", "vllm", "vllm-prefix", "vllm-offload")  # keep every token
    load_suites: tuple[str, ...] = ("test_latency", "test_vllm")  # serving suites whose rate tests are load tests
    min_strategies: int = 2  # a condition needs this many strategies to have a winner
    large_model_parameters: float = 1e9  # C1 is about large models: below this size it is not measurable

    @property
    def text(self) -> str:
        return (f"For every load condition (one device, model, dtype and trace: the same requests at one arrival "
                f"process and request rate, from test_characterization::test_load and the serving suites' "
                f"{' and '.join(self.load_suites)} runs without a KV memory limit), the winner is the strategy with "
                f"the highest goodput (requests per second meeting both the TTFT and the TPOT SLO). Strategies "
                f"within {self.tie:.0%} of the highest goodput tie, and the tie goes to the lowest median E2E "
                f"latency. A strategy whose perplexity ratio in the quality suite (test_quality, joined on the "
                f"strategy label) is above {self.max_perplexity_ratio:.2f} is excluded; {', '.join(self.exact)} "
                f"lose nothing (they keep or recompute every token) and count as 1.00; a strategy with no quality "
                f"measurement competes and is marked 'quality not measured'. Conditions with fewer than "
                f"{self.min_strategies} strategies are left out.")


RULE = Rule()


def _label_without(strategy: KVStrategy, drop: tuple[str, ...]) -> str:
    name, _, params = strategy.label().partition(":")
    kept = [p for p in params.split(",") if p and p.partition("=")[0] not in drop]
    return f"{name}:{','.join(kept)}" if kept else name


def _configured(key: str) -> property:
    """A Row attribute read from the measurement's configuration (None where the suite does not set it)."""
    return property(lambda row: row.m.config.get(key))


@dataclass
class Row:
    """One measurement as the study reads it, with the results file it came from (as given on the command line)."""

    source: str
    m: Measurement

    @property
    def test(self) -> str:
        """The test function, without its parameters."""
        return self.m.test_id.split("[")[0]

    @property
    def label(self) -> str:
        return self.m.config.get("strategy", "full")

    @cached_property
    def strategy(self) -> KVStrategy:
        return parse_strategy(self.label)

    @property
    def kind(self) -> str:
        return self.strategy.name

    @property
    def series(self) -> str:
        """The label without its budget: one line across budgets in a plot."""
        return _label_without(self.strategy, ("budget", *MEASUREMENT_ONLY))

    @property
    def quality_key(self) -> str:
        """What joins a serving measurement to the quality suite's measurement of the same policy."""
        return _label_without(self.strategy, MEASUREMENT_ONLY)

    @property
    def budgeted(self) -> bool:
        """Whether the strategy keeps a budget of tokens (the others keep every token)."""
        return hasattr(self.strategy, "budget")

    @property
    def budget(self) -> float | None:
        """KV budget as a fraction of each request's context: 1.0 for strategies that keep every token, None for a
        budget given in tokens."""
        budget = getattr(self.strategy, "budget", 1.0)
        return float(budget) if isinstance(budget, float) else None

    study = _configured("study")  # test_characterization's study (load, budget, capacity, ...), None elsewhere
    model = _configured("model")
    device = _configured("device")  # None where the suite does not record it (quality)
    dtype = _configured("dtype")
    kv_limit = _configured("kv_limit_bytes")  # bytes, None without a KV memory limit

    @property
    def _spec(self) -> dict:
        return (self.m.config.get("trace") or {}).get("spec") or {}

    @property
    def rate(self) -> float | None:
        """Trace request rate, req/s; math.inf when every request arrives at t=0; None without a trace."""
        rate = self._spec.get("rate")
        return None if rate is None else math.inf if rate == "inf" else float(rate)

    @property
    def arrival(self) -> str | None:
        if "arrival" in self.m.config:
            return self.m.config["arrival"]
        if not self._spec:
            return None
        burstiness = self._spec.get("burstiness", 1.0)
        return "poisson" if burstiness == 1.0 else f"gamma {burstiness:g}"

    @property
    def workload(self) -> str:
        """The trace's requests apart from their rate and seed: what a rate sweep keeps fixed."""
        spec = self._spec
        text = (f"{spec.get('num_requests')} requests, prompt {spec.get('prompt_len')} tok \u00b1"
                f"{spec.get('range_ratio', 0):.0%}, output {spec.get('output_len')} tok")
        return text + (f", {spec['shared_prefix_len']}-token shared prefix" if spec.get("shared_prefix_len") else "")

    @property
    def condition(self) -> tuple:
        """Rows of one condition ran the same requests on the same device, model and dtype."""
        return self.device, self.model, self.dtype, (self.m.config.get("trace") or {}).get("sha256")

    def value(self, metric: str) -> float | None:
        return self.m.summary(metric) if self.m.metrics.get(metric) else None


def grouped(rows: list[Row], key: Callable[[Row], tuple]) -> list[tuple[tuple, list[Row]]]:
    """Rows by key, in the order of the keys' text (a stable order for tables and figures)."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    return sorted(groups.items(), key=lambda item: str(item[0]))


@dataclass(frozen=True)
class Win:
    """The rule's verdict on one load condition: competitors best first, and those excluded by quality."""

    rows: tuple[Row, ...]
    ranked: tuple[Row, ...]
    excluded: tuple[tuple[Row, float], ...]
    unrated: tuple[Row, ...]
    reason: str

    @property
    def winner(self) -> Row | None:
        return self.ranked[0] if self.ranked else None

    @property
    def first(self) -> Row:
        return self.rows[0]

    def measured(self, kind: str) -> bool:
        return any(r.kind == kind for r in self.rows)


@dataclass
class Study:
    """Every row read from the results files, and the selections and decisions the page is built from."""

    sources: list[tuple[str, Results]]
    rule: Rule = RULE

    @cached_property
    def rows(self) -> list[Row]:
        return [Row(path, o.measurement) for path, results in self.sources for o in results.outcomes
                if o.measurement.metrics]

    def suite(self, suite: str) -> list[Row]:
        return [r for r in self.rows if r.m.suite == suite]

    @cached_property
    def load(self) -> list[Row]:
        """Rows of the load study: a trace at a request rate, no KV memory limit."""
        return [r for r in self.rows if r.rate is not None and r.kv_limit is None
                and (r.study == "load" or (r.study is None and r.m.suite in self.rule.load_suites))]

    @cached_property
    def sweeps(self) -> list[tuple[tuple, list[Row]]]:
        """Load rows by (device, model, arrival, workload) where the workload ran at two or more rates."""
        return [(key, rows) for key, rows in grouped(self.load, lambda r: (r.device, r.model, r.arrival, r.workload))
                if len({r.rate for r in rows}) > 1]

    @cached_property
    def budget(self) -> list[Row]:
        """Rows under a KV memory limit at rate inf: the budget study, and the serving suite's throughput test."""
        return [r for r in self.rows if r.study == "budget" or (r.study is None and r.m.suite == "test_throughput")]

    @cached_property
    def capacity(self) -> list[Row]:
        return [r for r in self.rows if r.study == "capacity" and r.value("capacity_rps") is not None]

    @cached_property
    def _quality(self) -> dict[str, Row]:
        found: dict[str, Row] = {}
        for r in self.suite("test_quality"):
            if r.value("perplexity_ratio") is not None:
                found.setdefault(r.quality_key, r)
        return found

    def perplexity(self, row: Row) -> float | None:
        """The quality suite's perplexity ratio for this row's policy; 1.0 for strategies that keep every token."""
        if row.kind in self.rule.exact:
            return 1.0
        scored = self._quality.get(row.quality_key)
        return None if scored is None else scored.value("perplexity_ratio")

    def screen(self, rows: list[Row]) -> tuple[list[Row], list[tuple[Row, float]], list[Row]]:
        """(rows that compete, rows excluded with their perplexity ratio, competing rows with no quality data)."""
        competing, excluded = [], []
        for r in rows:
            ppl = self.perplexity(r)
            if ppl is not None and ppl > self.rule.max_perplexity_ratio:
                excluded.append((r, ppl))
            else:
                competing.append(r)
        return competing, excluded, [r for r in competing if self.perplexity(r) is None]

    def decide(self, rows: list[Row]) -> Win:
        """The rule applied to the rows of one condition."""
        competing, excluded, unrated = self.screen([r for r in rows if r.value("goodput") is not None
                                                    and r.value("e2e_ms") is not None])
        if not competing:
            return Win(tuple(rows), (), tuple(excluded), (), "no strategy within the quality bound")
        best = max(r.value("goodput") for r in competing)
        tied = sorted((r for r in competing if r.value("goodput") >= (1 - self.rule.tie) * best),
                      key=lambda r: r.value("e2e_ms"))
        rest = sorted((r for r in competing if r not in tied), key=lambda r: (-r.value("goodput"), r.value("e2e_ms")))
        ranked = tied + rest
        winner = ranked[0]
        if len(tied) > 1:
            why = "no strategy met both SLOs" if best == 0 else f"goodput within {self.rule.tie:.0%}"
            reason = (f"{why} ({', '.join(r.label for r in tied)}): lowest E2E p50 wins "
                      f"({winner.value('e2e_ms'):.4g} vs {tied[1].value('e2e_ms'):.4g} ms)")
        elif len(ranked) > 1:
            second = ranked[1].value("goodput")
            reason = f"goodput {winner.value('goodput'):.4g} vs {second:.4g} req/s ({ranked[1].label})"
        else:
            reason = "the only strategy within the quality bound"
        return Win(tuple(rows), tuple(ranked), tuple(excluded), tuple(unrated), reason)

    @cached_property
    def wins(self) -> list[Win]:
        """The rule's verdict on every load condition with enough strategies, by model, arrival and rate."""
        wins = [self.decide(rows) for _, rows in grouped(self.load, lambda r: r.condition)
                if len({r.label for r in rows}) >= self.rule.min_strategies]
        return sorted(wins, key=lambda w: (str(w.first.device), str(w.first.model), str(w.first.arrival),
                                           w.first.rate))

    def pareto(self, rows: list[Row]) -> list[tuple[Row, float | None, bool]]:
        """(row, perplexity ratio, Pareto-optimal) for rows of one group: optimal when no other row with known
        quality has at least its throughput, at most its KV peak and at most its perplexity ratio, and is better
        in one. Rows without quality data are never optimal."""
        points = [(r, r.value("output_throughput"), r.value("kv_peak_bytes"), self.perplexity(r)) for r in rows
                  if r.value("output_throughput") is not None and r.value("kv_peak_bytes") is not None]
        rated = [p for p in points if p[3] is not None]

        def dominated(p: tuple) -> bool:
            return any(q[1] >= p[1] and q[2] <= p[2] and q[3] <= p[3] and (q[1], q[2], q[3]) != (p[1], p[2], p[3])
                       for q in rated)

        return [(r, ppl, ppl is not None and not dominated((r, thr, mem, ppl))) for r, thr, mem, ppl in points]

    def models(self, rows: list[Row]) -> list[str]:
        return sorted({str(r.model) for r in rows})
