"""Output quality of a KV strategy against the full cache, as pure functions of what an engine produced.

Every metric compares two runs over the same tokens: log-probability rows (n, vocab) from teacher forcing one
continuation through the full cache and through the strategy's, or their greedy tokens. Retrieval cases are
generated here, offline and seeded: the passkey prompt of Mohtashami & Jaggi (2023) and RULER's single needle,
multi-key needle and variable tracking (Hsieh et al., 2024). Nothing here runs a model: quality_fixture.py does.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files

import torch

from pytest_kvcache.errors import KVConfigError

Tokenize = Callable[[str], list[int]]


# ---------------------------------------------------------------- metrics


def _check_rows(reference: torch.Tensor, candidate: torch.Tensor) -> None:
    if reference.shape != candidate.shape or reference.dim() != 2:
        raise KVConfigError(f"log-probability rows must both be (n, vocab) and alike, got {tuple(reference.shape)} "
                            f"and {tuple(candidate.shape)}: score both strategies on the same continuation")


def token_kl(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """KL(reference || candidate) in nats at each position (n,), from log-softmax rows (n, vocab)."""
    _check_rows(reference, candidate)
    return (reference.exp() * (reference - candidate)).sum(dim=-1)


def kl_divergence(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean per-token KL(full || strategy): how far the strategy's next-token distribution moved, every token."""
    return float(token_kl(reference, candidate).mean())


def top1_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Fraction of positions where both predict the same next token, given the same (teacher-forced) prefix."""
    _check_rows(reference, candidate)
    return float((reference.argmax(dim=-1) == candidate.argmax(dim=-1)).float().mean())


def first_divergence(reference: Sequence[int], candidate: Sequence[int]) -> int:
    """Index of the first token where two free-running greedy continuations differ; their length if none does.
    (Free-running outputs differ everywhere after it, which is why position-wise agreement is not used.)"""
    if len(reference) != len(candidate):
        raise KVConfigError(f"greedy continuations of {len(reference)} and {len(candidate)} tokens: generate both "
                            "with the same number of new tokens")
    return next((i for i, (a, b) in enumerate(zip(reference, candidate)) if a != b), len(reference))


def target_logprobs(logprobs: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """log p(target) at each row (n,): row i scores targets[i]."""
    if logprobs.shape[0] != len(targets):
        raise KVConfigError(f"{logprobs.shape[0]} log-probability rows for {len(targets)} targets")
    return logprobs.gather(1, torch.as_tensor(list(targets))[:, None])[:, 0]


def perplexity(logprobs: torch.Tensor, targets: Sequence[int]) -> float:
    """exp(mean negative log-likelihood) of the targets."""
    return math.exp(-float(target_logprobs(logprobs, targets).mean()))


def answers_correct(logprobs: torch.Tensor, targets: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """For each answer span [start, end) of the targets: is every position's argmax the answer's token?
    Teacher forcing feeds the answer's own tokens, so this is exactly greedy exact match, without a free run."""
    if logprobs.shape[0] != len(targets):
        raise KVConfigError(f"{logprobs.shape[0]} log-probability rows for {len(targets)} targets")
    hits = logprobs.argmax(dim=-1) == torch.as_tensor(list(targets))
    for start, end in spans:
        if not 0 < start < end <= len(targets):
            raise KVConfigError(f"answer span [{start}, {end}) outside rows 1..{len(targets)} (row 0 comes from the "
                                "full-attention prefill and says nothing about the cache)")
    return [bool(hits[start:end].all()) for start, end in spans]


def discriminative(full_accuracy: float, floor: float) -> bool:
    """A retrieval cell ranks strategies only if the full cache itself reaches the floor there."""
    if not 0 <= floor <= 1:
        raise KVConfigError(f"the accuracy floor must be in [0, 1], got {floor}")
    return full_accuracy >= floor


# ---------------------------------------------------------------- shipped text


def data_text(name: str) -> str:
    """A text shipped in pytest_kvcache/data (see the README there for sources and licences)."""
    return files("pytest_kvcache").joinpath(f"data/{name}").read_text(encoding="utf-8")


def evaluation_text() -> str:
    """The evaluation text: chapters I-III of The Reign of Greed (Rizal, tr. Derbyshire 1912), public domain."""
    return data_text("evaluation.txt")


def text_windows(ids: Sequence[int], windows: int, length: int) -> list[list[int]]:
    """`windows` non-overlapping spans of `length` tokens, spread evenly over ids."""
    if windows < 1 or length < 2:
        raise KVConfigError(f"need at least one window of at least 2 tokens, got {windows} x {length}")
    if windows * length > len(ids):
        raise KVConfigError(f"{windows} windows of {length} tokens need {windows * length} tokens; the text has "
                            f"{len(ids)}: ship a longer text or ask for fewer or shorter windows")
    stride = (len(ids) - length) // max(1, windows - 1) if windows > 1 else 0
    return [list(ids[i * stride : i * stride + length]) for i in range(windows)]


def sentences(text: str) -> list[str]:
    """Sentences of a prose text with its line wrapping undone."""
    flat = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?”\"])\s+(?=[A-Z“\"])", flat) if s]


# ---------------------------------------------------------------- retrieval cases

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
ADJECTIVES = ("red", "blue", "green", "silver", "golden", "quiet", "happy", "brave", "calm", "bright", "dark",
              "early", "late", "small", "large", "old", "young", "cold", "warm", "wild", "soft", "loud", "swift",
              "lazy", "proud", "shy", "wise", "bold", "kind", "lucky")
NOUNS = ("apple", "river", "stone", "falcon", "garden", "harbor", "lantern", "meadow", "mirror", "needle", "orchard",
         "pepper", "quarry", "rabbit", "saddle", "tiger", "violin", "window", "anchor", "basket", "candle", "dragon",
         "engine", "feather", "glacier", "hammer", "island", "jacket", "kettle", "ladder", "marble", "pillow",
         "rocket", "shadow", "tunnel", "wagon", "walrus", "yacht", "zebra", "bridge")
KEYS = tuple(f"{a} {n}" for a in ADJECTIVES for n in NOUNS)


@dataclass(frozen=True)
class TaskSpec:
    """How one retrieval task writes its prompt: the haystack, the needle sentence, the question, and the cue
    that precedes each answer in the teacher-forced continuation."""

    intro: str
    haystack: str  # "noise": repeated filler; "essay": the evaluation text; "needles": needles never asked for
    fact: str  # with {key} and {value}
    question: str
    cue: str  # with {key}
    hops: int = 0  # variable tracking: assignments that pass the value on to the next variable


_MAGIC_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the numbers afterwards.\n")
TASKS: dict[str, TaskSpec] = {
    # Mohtashami & Jaggi (2023), the prompt StreamingLLM evaluates; one keyed pass key per sample
    "passkey": TaskSpec(
        intro=("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.\n"),
        haystack="noise",
        fact="The pass key of the {key} is {value}. Remember it. {value} is the pass key of the {key}.",
        question="\nWhat is the pass key of each item?",
        cue="\nThe pass key of the {key} is",
    ),
    # RULER niah_single_2: needles in an essay
    "needle": TaskSpec(_MAGIC_INTRO, "essay", "One of the special magic numbers for {key} is: {value}.",
                       "\nWhat are the special magic numbers mentioned in the provided text?",
                       "\nThe special magic number for {key} is:"),
    # RULER niah_multikey_2: the haystack itself is needles with other keys
    "multikey": TaskSpec(_MAGIC_INTRO, "needles", "One of the special magic numbers for {key} is: {value}.",
                         "\nWhat are the special magic numbers mentioned in the provided text?",
                         "\nThe special magic number for {key} is:"),
    # RULER vt: a value passed along a chain of assignments in noise; asked at the chain's end
    "vartrack": TaskSpec("Memorize and track the chain(s) of variable assignment hidden in the following text.\n",
                         "noise", "VAR {key} = {value}.", "\nWhat number does each variable hold?",
                         "\nVAR {key} =", hops=2),
}


@dataclass(frozen=True)
class Needle:
    """One retrieval sample: the sentences hidden for it (a chain for variable tracking), where the first one
    goes (fraction of the haystack), the key it is asked by and the value that answers it."""

    key: str
    value: str
    facts: tuple[str, ...]
    depth: float


@dataclass(frozen=True)
class RetrievalCase:
    """One prompt and its teacher-forced continuation: a cue then an answer per needle, in the order asked;
    spans[i] are the positions of needles[i]'s answer in the continuation."""

    task: str
    n_tokens: int
    seed: int
    prompt: tuple[int, ...]
    continuation: tuple[int, ...]
    needles: tuple[Needle, ...]
    spans: tuple[tuple[int, int], ...]

    @property
    def tokens(self) -> list[int]:
        return [*self.prompt, *self.continuation]


def _variable(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _needles(spec: TaskSpec, rng: random.Random, keys, samples: int, digits: int) -> list[Needle]:
    needles = []
    for i in range(samples):
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        depth = (i + rng.uniform(0.1, 0.9)) / samples
        if spec.hops:
            names = [_variable(rng) for _ in range(spec.hops + 1)]
            facts = (spec.fact.format(key=names[0], value=value),
                     *(f"VAR {names[h + 1]} = VAR {names[h]}." for h in range(spec.hops)))
            needles.append(Needle(names[-1], value, facts, depth))
        else:
            key = next(keys)
            needles.append(Needle(key, value, (spec.fact.format(key=key, value=value),), depth))
    return needles


def _haystack(spec: TaskSpec, rng: random.Random, keys, digits: int):
    """An endless supply of haystack sentences."""
    if spec.haystack == "noise":
        while True:
            yield NOISE
    if spec.haystack == "needles":
        for key in keys:
            yield spec.fact.format(key=key, value=rng.randrange(10 ** (digits - 1), 10**digits))
        raise KVConfigError(f"ran out of keys ({len(KEYS)}) for the needle haystack: ask for a shorter prompt")
    essay = sentences(evaluation_text())
    start = rng.randrange(len(essay))
    while True:
        yield from essay[start:]
        start = 0


def _assemble(spec: TaskSpec, needles: Sequence[Needle], body: Sequence[str], sizes: Sequence[int]) -> str:
    """The prompt text: each needle's facts between haystack sentences, at the sentence boundary nearest to its
    depth (measured in haystack tokens, `sizes` per sentence), chains in order."""
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    slots: list[list[str]] = [[] for _ in range(len(body) + 1)]
    for needle in needles:
        for h, fact in enumerate(needle.facts):
            target = (needle.depth + (1 - needle.depth) * h / len(needle.facts)) * bounds[-1]
            slots[min(range(len(bounds)), key=lambda i: abs(bounds[i] - target))].append(fact)
    parts: list[str] = []
    for unit, hidden in zip(body, slots):
        parts += [*hidden, unit]
    parts += slots[-1]
    return spec.intro + " ".join(parts) + spec.question


def retrieval_case(task: str, tokenize: Tokenize, n_tokens: int, samples: int = 10, seed: int = 0,
                   digits: int = 4) -> RetrievalCase:
    """A prompt of at most n_tokens holding `samples` needles at evenly spread depths, asked in a seeded order.
    The same (task, n_tokens, samples, seed, digits) gives the same case on every machine."""
    if task not in TASKS:
        raise KVConfigError(f"unknown retrieval task {task!r}: choose from {', '.join(TASKS)}")
    if samples < 1 or digits < 1:
        raise KVConfigError(f"need samples >= 1 and digits >= 1, got {samples} and {digits}")
    spec = TASKS[task]
    rng = random.Random(f"{task}:{n_tokens}:{samples}:{seed}:{digits}")
    keys = iter(rng.sample(KEYS, len(KEYS)))
    needles = _needles(spec, rng, keys, samples, digits)
    used = len(tokenize(_assemble(spec, needles, [], [])))
    if used > n_tokens:
        raise KVConfigError(f"{samples} {task} needles need {used} tokens, more than the {n_tokens} asked for")
    body: list[str] = []
    sizes: list[int] = []
    for unit in _haystack(spec, rng, keys, digits):
        sizes.append(len(tokenize(" " + unit)))
        used += sizes[-1]
        if used > n_tokens:
            sizes.pop()
            break
        body.append(unit)
    prompt = tokenize(_assemble(spec, needles, body, sizes))
    while len(prompt) > n_tokens:
        body.pop()
        sizes.pop()
        prompt = tokenize(_assemble(spec, needles, body, sizes))
    asked = rng.sample(needles, samples)
    continuation: list[int] = []
    spans = []
    for needle in asked:
        continuation += tokenize(spec.cue.format(key=needle.key))
        answer = tokenize(" " + needle.value)
        spans.append((len(continuation), len(continuation) + len(answer)))
        continuation += answer
    return RetrievalCase(task, n_tokens, seed, tuple(prompt), tuple(continuation), tuple(asked), tuple(spans))
