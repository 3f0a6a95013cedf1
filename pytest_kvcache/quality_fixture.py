"""Fixtures kv_quality and kv_retrieval: a strategy's output quality against the full cache, on real weights.

Each prompt is prefilled once (engines.decoder.record_prefill) and replayed into the cache of every strategy the
session asks for: every policy prefills with full attention, so this is exact. Each strategy then teacher-forces
the same continuation and quality.py scores the log-probabilities. Prompts go one at a time and only the small
per-strategy results are kept, so memory holds one prompt's record (~0.5 GB at 4k tokens on SmolLM2). The
strategies come from the session's collected tests (under pytest-xdist every worker computes all of them).
Torch and the engine are imported when a fixture first runs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.plugin import kv_session
from pytest_kvcache.results import Measurement

if TYPE_CHECKING:
    from pytest_kvcache.models import LoadedModel
    from pytest_kvcache.strategies.base import KVStrategy

log = logging.getLogger(__name__)
FULL = "full"


@dataclass(frozen=True)
class TextSetup:
    """Text metrics: `windows` spans of the evaluation text, each `prefill` prompt tokens then `continuation`
    teacher-forced tokens, and `greedy` free-running tokens from the same prompt for the first divergence."""

    windows: int = 2
    prefill: int = 1024
    continuation: int = 64
    greedy: int = 16


@dataclass(frozen=True)
class RetrievalSetup:
    """Retrieval: one prompt per task and length holding `samples` needles with `digits`-digit values; a task
    whose full-cache accuracy is below `floor` is not discriminative at that length and is not gated."""

    tasks: tuple[str, ...] = ("passkey", "needle", "multikey", "vartrack")
    samples: int = 10
    digits: int = 4
    seed: int = 0
    floor: float = 0.5


@dataclass(frozen=True)
class WindowScore:
    """One strategy on one evaluation window, against the full cache."""

    kl: float
    top1: float
    nll: float
    first_divergence: int


@dataclass
class RetrievalCell:
    """One task at one length: the case asked, the full cache's answers, and each strategy's (None where the
    cell is not discriminative, so the strategy was not run)."""

    case: object
    full: list[bool]
    discriminative: bool
    answers: dict[str, list[bool] | None] = field(default_factory=dict)


def prefill_kept(strategy: KVStrategy, prompt: int, steps: int) -> int:
    """Prompt tokens a strategy keeps after prefill for a request of `prompt` + `steps` tokens (all, without a
    budget; InfiniGen keeps every token on the host and fetches at most this many per step)."""
    from pytest_kvcache.strategies.base import budget_tokens
    from pytest_kvcache.traces import Request

    budget = getattr(strategy, "budget", None)
    if budget is None:
        return prompt
    return min(prompt, budget_tokens(budget, Request("kept", 0.0, (0,) * prompt, steps)))


class QualityRun:
    """One model's quality evaluations in this session: every asked strategy, one prompt at a time."""

    def __init__(self, model: LoadedModel) -> None:
        if model.tokenizer is None:
            raise KVConfigError(f"quality needs real weights and a tokenizer; model {model.name!r} has none: "
                                "use smollm2")
        self.model = model
        self.errors: dict[str, BaseException] = {}
        self.text: dict[tuple[TextSetup, str], list[WindowScore]] = {}
        self.cells: dict[tuple[RetrievalSetup, str, int], RetrievalCell] = {}

    def tokenize(self, text: str) -> list[int]:
        return list(self.model.tokenizer(text).input_ids)

    def _engine(self, label: str):
        """A fresh engine per call: engines keep their cache, and a session asks for a dozen strategies."""
        from pytest_kvcache.engines.hf import HFEngine
        from pytest_kvcache.strategies import parse_strategy

        return HFEngine(self.model, parse_strategy(label))

    def _each(self, labels: list[str], work: Callable[..., object], *args) -> dict[str, object]:
        """work(label, *args) for each label not failed yet; a failure is kept and raised in that strategy's test."""
        done = {}
        for label in labels:
            if label in self.errors:
                continue
            start = time.perf_counter()
            try:
                done[label] = work(label, *args)
            except Exception as error:  # noqa: BLE001 - one strategy's failure must not fail the others' tests
                self.errors[label] = error
            log.info("quality: %s in %.1f s", label, time.perf_counter() - start)
        return done

    def raise_for(self, label: str) -> None:
        if label in self.errors:
            raise self.errors[label]

    def text_scores(self, setup: TextSetup, labels: list[str]) -> None:
        """Score every label not scored yet on every evaluation window, against the full cache's rows there."""
        from pytest_kvcache import quality
        from pytest_kvcache.engines.decoder import record_prefill

        todo = [label for label in sorted({FULL, *labels}) if (setup, label) not in self.text
                and label not in self.errors]
        if not todo:
            return
        length = setup.prefill + setup.continuation
        windows = quality.text_windows(self.tokenize(quality.evaluation_text()), setup.windows, length)
        scores: dict[str, list[WindowScore]] = {label: [] for label in todo}
        for window in windows:
            record = record_prefill(self.model, window[: setup.prefill])
            reference = self._engine(FULL).teacher_forced(window, setup.prefill, record=record)
            greedy = self._engine(FULL).greedy(window[: setup.prefill], setup.greedy, record=record)
            for label, result in self._each(todo, self._score_window, setup, window, record, reference, greedy).items():
                scores[label].append(result)
            del record
        self.text.update({(setup, label): result for label, result in scores.items() if label not in self.errors})

    def _score_window(self, label: str, setup: TextSetup, window: list[int], record, reference, greedy) -> WindowScore:
        from pytest_kvcache import quality

        rows, tokens = reference, greedy
        if label != FULL:
            rows = self._engine(label).teacher_forced(window, setup.prefill, record=record)
            tokens = self._engine(label).greedy(window[: setup.prefill], setup.greedy, record=record)
        return WindowScore(quality.kl_divergence(reference, rows), quality.top1_agreement(reference, rows),
                           -float(quality.target_logprobs(rows, window[setup.prefill :]).mean()),
                           quality.first_divergence(greedy, tokens))

    def _answer(self, label: str, case, record) -> list[bool]:
        from pytest_kvcache import quality

        rows = self._engine(label).teacher_forced(case.tokens, len(case.prompt), record=record)
        return quality.answers_correct(rows, case.continuation, case.spans)

    def retrieval_cells(self, setup: RetrievalSetup, length: int, labels: list[str]) -> None:
        """Answer each task's case at this length with every label not run yet: the full cache first, the
        others only where it reaches the floor."""
        from pytest_kvcache import quality
        from pytest_kvcache.engines.decoder import record_prefill

        for task in setup.tasks:
            cell = self.cells.get((setup, task, length))
            todo = [label for label in sorted(set(labels) - {FULL}) if label not in self.errors
                    and (cell is None or label not in cell.answers)]
            if cell is not None and (not todo or not cell.discriminative):
                cell.answers.update(dict.fromkeys(todo))
                continue
            case = cell.case if cell else quality.retrieval_case(task, self.tokenize, length, setup.samples,
                                                                 setup.seed, setup.digits)
            record = record_prefill(self.model, list(case.prompt))
            if cell is None:
                full = self._each([FULL], self._answer, case, record).get(FULL)
                self.raise_for(FULL)
                cell = RetrievalCell(case, full, quality.discriminative(sum(full) / len(full), setup.floor))
                self.cells[(setup, task, length)] = cell
            cell.answers.update(self._each(todo, self._answer, case, record) if cell.discriminative
                                else dict.fromkeys(todo))
            del record


def _session_labels(request: pytest.FixtureRequest, fixture: str, model: str) -> list[str]:
    """Strategy labels of every collected test using `fixture` on `model`."""
    labels = set()
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        uses = fixture in getattr(item, "fixturenames", ()) and params.get("kv_model", model) == model
        if uses and "kv_strategy" in params:
            labels.add(params["kv_strategy"])
    return sorted(labels)


_RUNS = pytest.StashKey[dict]()


class _QualityFixture:
    """What kv_quality and kv_retrieval share: the session's runs and recording a measurement."""

    fixture = ""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.request = request
        self.session = kv_session(request.config)
        self.session.start()

    def _run(self, model: LoadedModel) -> QualityRun:
        runs = self.request.config.stash.setdefault(_RUNS, {})
        if model.name not in runs:
            runs[model.name] = QualityRun(model)
        return runs[model.name]

    def _labels(self, model: LoadedModel) -> list[str]:
        """Every strategy this session's tests ask of this fixture, so each prompt is prefilled once for all."""
        return _session_labels(self.request, self.fixture, model.name)

    def _record(self, config: dict, metrics: dict[str, list[float]], info: dict) -> Measurement:
        """config: what the scores are comparable on (hashed); info: what was observed beside the metrics."""
        node = self.request.node
        measurement = Measurement(node.name, Path(str(node.path)).stem, config, metrics, None, self.session.machine(),
                                  info)
        self.session.record(node, measurement)
        return measurement


def text_result(run: QualityRun, strategy: KVStrategy | str, setup: TextSetup) -> tuple[dict, dict[str, list[float]], dict]:
    """(config, metrics, info) of one strategy on the evaluation text, against the full cache."""
    from pytest_kvcache.strategies import parse_strategy

    strategy = parse_strategy(strategy)
    label = strategy.label()
    run.text_scores(setup, [label])
    run.raise_for(FULL)
    run.raise_for(label)
    scores, full = run.text[(setup, label)], run.text[(setup, FULL)]
    ppl, full_ppl = (math.exp(sum(s.nll for s in x) / len(x)) for x in (scores, full))
    kept = prefill_kept(strategy, setup.prefill, setup.continuation)
    config = {
        "model": run.model.name,
        "strategy": label,
        "text": "pytest_kvcache/data/evaluation.txt",
        "windows": setup.windows,
        "prefill_tokens": setup.prefill,
        "continuation_tokens": setup.continuation,
        "greedy_tokens": setup.greedy,
        "prefill_kept": kept,
        "prefill_compression": kept / setup.prefill,
    }
    info = {
        "perplexity": ppl,
        "perplexity_full": full_ppl,
        "per_window": [vars(s) for s in scores],
    }
    metrics = {
        "top1_agreement": [sum(s.top1 for s in scores) / len(scores)],
        "kl_divergence": [sum(s.kl for s in scores) / len(scores)],
        "perplexity_ratio": [ppl / full_ppl],
        "first_divergence": [sum(s.first_divergence for s in scores) / len(scores)],
    }
    return config, metrics, info


def retrieval_result(run: QualityRun, strategy: KVStrategy | str, length: int,
                     setup: RetrievalSetup) -> tuple[dict, dict[str, list[float]], dict]:
    """(config, metrics, info) of one strategy on every retrieval task at one length; only discriminative tasks get a
    metric, the others are in the config with the full cache's accuracy."""
    from pytest_kvcache.strategies import parse_strategy

    strategy = parse_strategy(strategy)
    label = strategy.label()
    run.retrieval_cells(setup, length, [label])
    run.raise_for(FULL)
    run.raise_for(label)
    tasks, prompts, metrics = {}, {}, {}
    for task in setup.tasks:
        cell = run.cells[(setup, task, length)]
        answers = cell.full if label == FULL else cell.answers[label]
        steps = len(cell.case.continuation)
        prompts[task] = {
            "depths": [round(n.depth, 3) for n in cell.case.needles],
            "prompt_tokens": len(cell.case.prompt),
            "continuation_tokens": steps,
            "prefill_kept": prefill_kept(strategy, len(cell.case.prompt), steps),
        }
        tasks[task] = {
            "discriminative": cell.discriminative,
            "full_accuracy": sum(cell.full) / len(cell.full),
            "accuracy": None if answers is None else sum(answers) / len(answers),
            "correct": answers,
        }
        if cell.discriminative:
            metrics[f"{task}_accuracy"] = [tasks[task]["accuracy"]]
    config = {"model": run.model.name, "strategy": label, "length": length, "samples": setup.samples,
              "digits": setup.digits, "seed": setup.seed, "floor": setup.floor, "prompts": prompts}
    return config, metrics, {"tasks": tasks}


class KVQuality(_QualityFixture):
    """Scores a strategy on the evaluation text against the full cache, all metrics on the same continuation."""

    fixture = "kv_quality"

    def __call__(self, model: LoadedModel, strategy: KVStrategy | str, setup: TextSetup = TextSetup()) -> Measurement:
        run = self._run(model)
        run.text_scores(setup, self._labels(model))
        return self._record(*text_result(run, strategy, setup))


class KVRetrieval(_QualityFixture):
    """Answers the retrieval tasks at one length with a strategy; tasks the full cache fails are reported, not gated."""

    fixture = "kv_retrieval"

    def __call__(self, model: LoadedModel, strategy: KVStrategy | str, length: int,
                 setup: RetrievalSetup = RetrievalSetup()) -> Measurement:
        run = self._run(model)
        run.retrieval_cells(setup, length, self._labels(model))
        config, metrics, info = retrieval_result(run, strategy, length, setup)
        for task, cell in info["tasks"].items():
            note = (f"retrieval: {task} at {length} tokens is not discriminative on {model.name} (full cache "
                    f"{cell['full_accuracy']:.2f} < floor {setup.floor}): reported, not gated")
            if not cell["discriminative"] and note not in self.session.warnings:
                self.session.warnings.append(note)
        return self._record(config, metrics, info)


@pytest.fixture
def kv_quality(request: pytest.FixtureRequest) -> KVQuality:
    """kv_quality(model, strategy) -> Measurement of top1_agreement, kl_divergence, perplexity_ratio and
    first_divergence against the full cache on the evaluation text; fails the test on a regression."""
    return KVQuality(request)


@pytest.fixture
def kv_retrieval(request: pytest.FixtureRequest) -> KVRetrieval:
    """kv_retrieval(model, strategy, length) -> Measurement of <task>_accuracy for passkey, needle, multikey and
    vartrack at one prompt length; fails the test on a regression."""
    return KVRetrieval(request)
