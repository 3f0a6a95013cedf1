"""Output quality of a strategy against the full cache, on real weights: greedy agreement, perplexity ratio and
passkey retrieval. Without these, "evict everything" would win every speed benchmark."""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib.resources import files

from pytest_kvcache.engines.hf import HFEngine
from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.models import LoadedModel
from pytest_kvcache.strategies import parse_strategy
from pytest_kvcache.strategies.base import KVStrategy
from pytest_kvcache.traces import Request, Trace

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
PASSKEY_DEPTHS = (0.1, 0.5, 0.9)
PASSKEY_KEYS = (68217, 40953, 91346)


def _tokenizer(model: LoadedModel):
    if model.tokenizer is None:
        raise KVConfigError(f"quality needs real weights and a tokenizer; model {model.name!r} has none: use smollm2")
    return model.tokenizer


def reference_text() -> str:
    """The fixed text shipped with the package (US Declaration of Independence, public domain)."""
    return files("pytest_kvcache").joinpath("data/declaration.txt").read_text()


def text_tokens(model: LoadedModel, n_tokens: int) -> list[int]:
    ids = _tokenizer(model)(reference_text()).input_ids
    if len(ids) < n_tokens:
        raise KVConfigError(f"the reference text has {len(ids)} tokens, fewer than the {n_tokens} asked for")
    return list(ids[:n_tokens])


def agreement_trace(model: LoadedModel, prompts: int = 4, prompt_len: int = 192, new_tokens: int = 32) -> Trace:
    """Real-text prompts (windows of the reference text), all arriving at t=0."""
    ids = text_tokens(model, prompt_len + (prompts - 1) * 48)
    requests = tuple(
        Request(f"q{i}", 0.0, tuple(ids[i * 48 : i * 48 + prompt_len]), new_tokens) for i in range(prompts)
    )
    return Trace(requests, source="reference-text")


def generate(model: LoadedModel, strategy: KVStrategy | str, trace: Trace) -> dict[str, list[int]]:
    result = HFEngine(model, parse_strategy(strategy)).run(trace)
    return {r.id: r.output_ids for r in result.records}


def token_agreement(reference: dict[str, list[int]], candidate: dict[str, list[int]]) -> float:
    """Fraction of generated positions where the candidate's greedy token equals the full cache's."""
    total = sum(len(tokens) for tokens in reference.values())
    same = sum(a == b for rid, tokens in reference.items() for a, b in zip(tokens, candidate[rid]))
    return same / total


def perplexity(model: LoadedModel, strategy: KVStrategy | str, tokens: list[int], prefill_tokens: int) -> float:
    """exp(mean NLL) of the tokens after the prefill, teacher-forced through the strategy's cache."""
    scores = HFEngine(model, parse_strategy(strategy)).score(tokens, prefill_tokens)
    return math.exp(-sum(scores) / len(scores))


@dataclass(frozen=True)
class PasskeyCase:
    """One passkey question: where the key was hidden, what the model answered, whether it was right."""

    depth: float
    key: int
    answer: str
    correct: bool


def passkey_prompt(model: LoadedModel, key: int, depth: float, fillers: int = 40) -> list[int]:
    """The passkey-retrieval prompt of Mohtashami & Jaggi (2023) as StreamingLLM uses it: the key hidden at
    `depth` (0 = start, 1 = end) of repeated filler text; ~1k tokens with 40 fillers on SmolLM2."""
    if not 0 <= depth <= 1:
        raise KVConfigError(f"passkey depth must be in [0, 1], got {depth}")
    parts = [PASSKEY_FILLER] * fillers
    parts.insert(round(depth * fillers), f"The pass key is {key}. Remember it. {key} is the pass key. ")
    return list(_tokenizer(model)(PASSKEY_INTRO + "".join(parts) + PASSKEY_QUESTION).input_ids)


def passkey_trace(model: LoadedModel, depths=PASSKEY_DEPTHS, keys=PASSKEY_KEYS, fillers: int = 40,
                  answer_tokens: int = 8) -> Trace:
    requests = tuple(
        Request(f"passkey-{key}-{depth}", 0.0, tuple(passkey_prompt(model, key, depth, fillers)), answer_tokens)
        for depth, key in zip(depths, keys)
    )
    return Trace(requests, source="passkey")


def passkey(model: LoadedModel, strategy: KVStrategy | str, trace: Trace) -> list[PasskeyCase]:
    """Ask every passkey question of the trace; an answer is right when it contains the key's digits."""
    outputs = generate(model, strategy, trace)
    cases = []
    for request in trace.requests:
        _, key, depth = request.id.split("-")
        answer = _tokenizer(model).decode(outputs[request.id])
        cases.append(PasskeyCase(float(depth), int(key), answer, key in answer))
    return cases
