"""Request traces: seeded synthetic workloads and JSONL files, so every machine replays the same requests."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pytest_kvcache.errors import KVConfigError

TRACE_FORMAT = 1


class TraceError(KVConfigError):
    """A trace file or trace parameter that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Request:
    """One request of a trace: when it arrives, what it asks, how many tokens it must generate."""

    id: str
    arrival_s: float
    prompt_ids: tuple[int, ...]
    max_new_tokens: int

    @property
    def context_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass(frozen=True)
class TraceSpec:
    """Generator parameters; the same spec gives the same trace on every machine.

    rate: requests per second (math.inf: all arrive at t=0).
    burstiness: gamma shape of the inter-arrival gaps (1.0 = Poisson, < 1 burstier), as in vLLM's benchmark.
    prompt_len / output_len: mean lengths; lengths are uniform in [mean*(1-range_ratio), mean*(1+range_ratio)].
    shared_prefix_len: leading prompt tokens shared by every request (prefix-caching workloads).
    max_concurrency: the client keeps at most this many requests in flight (0: no limit); a request due while the
    limit is reached is sent when one finishes, so with rate=inf this is a closed loop (vLLM's --max-concurrency).
    """

    num_requests: int = 16
    rate: float = 4.0
    burstiness: float = 1.0
    prompt_len: int = 128
    output_len: int = 32
    range_ratio: float = 0.0
    shared_prefix_len: int = 0
    vocab_size: int = 512
    seed: int = 0
    max_concurrency: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.num_requests >= 1, f"num_requests must be >= 1, got {self.num_requests}"),
            (self.rate > 0, f"rate must be > 0 requests/s (inf for all at once), got {self.rate}"),
            (self.burstiness > 0, f"burstiness must be > 0 (1.0 = Poisson), got {self.burstiness}"),
            (self.prompt_len >= 1, f"prompt_len must be >= 1, got {self.prompt_len}"),
            (self.output_len >= 1, f"output_len must be >= 1, got {self.output_len}"),
            (0 <= self.range_ratio < 1, f"range_ratio must be in [0, 1), got {self.range_ratio}"),
            (
                0 <= self.shared_prefix_len <= self.prompt_len * (1 - self.range_ratio),
                f"shared_prefix_len must be in [0, shortest prompt], got {self.shared_prefix_len}",
            ),
            (self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}"),
            (self.max_concurrency >= 0, f"max_concurrency must be >= 0 (0: no limit), got {self.max_concurrency}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TraceError(f"trace spec: {message}")


@dataclass(frozen=True)
class Trace:
    """An immutable, ordered list of requests plus the spec that made it (None for hand-written files)."""

    requests: tuple[Request, ...]
    spec: TraceSpec | None = None
    source: str = field(default="synthetic", compare=False)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def max_context_tokens(self) -> int:
        return max(r.context_tokens for r in self.requests)

    @property
    def max_concurrency(self) -> int:
        """Requests the client keeps in flight at most (0: no limit), from the generator spec."""
        return self.spec.max_concurrency if self.spec is not None else 0

    def head(self, n: int) -> Trace:
        """The first n requests, all arriving at t=0 (used for warm-up)."""
        return Trace(tuple(Request(r.id, 0.0, r.prompt_ids, r.max_new_tokens) for r in self.requests[:n]), None)

    def describe(self) -> dict:
        if self.spec is not None:
            return {"source": self.source, **asdict(self.spec)}
        return {"source": self.source, "num_requests": len(self.requests)}


def arrival_gaps(rng: np.random.Generator, n: int, rate: float, burstiness: float) -> np.ndarray:
    """Inter-arrival gaps: gamma(shape=burstiness, scale=1/(rate*burstiness)); Poisson when burstiness is 1."""
    if math.isinf(rate):
        return np.zeros(n)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def _lengths(rng: np.random.Generator, n: int, mean: int, range_ratio: float) -> np.ndarray:
    low = max(1, int(math.floor(mean * (1 - range_ratio))))
    high = max(low, int(math.ceil(mean * (1 + range_ratio))))
    return rng.integers(low, high + 1, size=n)


def synthetic(spec: TraceSpec) -> Trace:
    """A seeded synthetic trace; token ids avoid 0-3 so special tokens never appear."""
    rng = np.random.default_rng(spec.seed)
    gaps = arrival_gaps(rng, spec.num_requests, spec.rate, spec.burstiness)
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    prompt_lens = _lengths(rng, spec.num_requests, spec.prompt_len, spec.range_ratio)
    output_lens = _lengths(rng, spec.num_requests, spec.output_len, spec.range_ratio)
    low_token = min(4, spec.vocab_size - 1)
    prefix = rng.integers(low_token, spec.vocab_size, size=spec.shared_prefix_len)
    requests = []
    for i in range(spec.num_requests):
        tail = rng.integers(low_token, spec.vocab_size, size=int(prompt_lens[i]) - spec.shared_prefix_len)
        prompt = tuple(int(t) for t in np.concatenate([prefix, tail]))
        requests.append(Request(f"r{i}", round(float(arrivals[i]), 6), prompt, int(output_lens[i])))
    return Trace(tuple(requests), spec)


def _spec_to_json(spec: TraceSpec | None) -> dict | None:
    """Strict JSON has no Infinity: an all-at-once rate is written as the string "inf"."""
    if spec is None:
        return None
    data = asdict(spec)
    if math.isinf(data["rate"]):
        data["rate"] = "inf"
    return data


def _spec_from_json(data: object, where: str) -> TraceSpec | None:
    if not data:
        return None
    if not isinstance(data, dict):
        raise TraceError(f"{where}: 'spec' must be an object of trace parameters")
    data = dict(data)
    if data.get("rate") == "inf":
        data["rate"] = math.inf
    try:
        return TraceSpec(**data)
    except TypeError as e:
        raise TraceError(f"{where}: bad trace spec ({e})") from None
    except TraceError as e:
        raise TraceError(f"{where}: {e}") from None


def save_jsonl(trace: Trace, path: str | os.PathLike) -> None:
    """Write a header line (format, spec) and one line per request, atomically (old file or new, never half)."""
    path = Path(path)
    header = {"trace_format": TRACE_FORMAT, "spec": _spec_to_json(trace.spec)}
    lines = [json.dumps(header, allow_nan=False)]
    lines += [
        json.dumps({"id": r.id, "arrival_s": r.arrival_s, "prompt_ids": list(r.prompt_ids),
                    "max_new_tokens": r.max_new_tokens}, allow_nan=False)
        for r in trace.requests
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _field(obj: dict, key: str, kind: type, where: str):
    if key not in obj:
        raise TraceError(f"{where}: missing field '{key}'")
    value = obj[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = {float: "a number", int: "an integer", str: "a string", list: "a list"}[kind]
        raise TraceError(f"{where}: field '{key}' must be {expected}, got {value!r}")
    return value


def _parse_request(obj: object, where: str, vocab_size: int | None) -> Request:
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object with id, arrival_s, prompt_ids, max_new_tokens")
    rid = _field(obj, "id", str, where)
    arrival = _field(obj, "arrival_s", float, where)
    prompt = _field(obj, "prompt_ids", list, where)
    max_new = _field(obj, "max_new_tokens", int, where)
    if not math.isfinite(arrival) or arrival < 0:
        raise TraceError(f"{where}: 'arrival_s' must be a finite number >= 0, got {arrival}")
    if max_new < 1:
        raise TraceError(f"{where}: 'max_new_tokens' must be an integer >= 1, got {max_new}")
    if not prompt:
        raise TraceError(f"{where}: 'prompt_ids' must be a non-empty list of token ids")
    for t in prompt:
        if not isinstance(t, int) or isinstance(t, bool) or t < 0 or (vocab_size is not None and t >= vocab_size):
            limit = f"< {vocab_size}" if vocab_size is not None else ">= 0"
            raise TraceError(f"{where}: 'prompt_ids' must hold integer token ids {limit}, found {t!r}")
    return Request(rid, arrival, tuple(prompt), max_new)


def load_jsonl(path: str | os.PathLike, vocab_size: int | None = None) -> Trace:
    """Read and validate a trace file; any problem raises TraceError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise TraceError(f"cannot read trace file {path}: {e.strerror}") from None
    spec = None
    requests: list[Request] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if isinstance(obj, dict) and "trace_format" in obj:
            if obj["trace_format"] != TRACE_FORMAT:
                raise TraceError(f"{where}: trace_format {obj['trace_format']!r} is not supported (expected {TRACE_FORMAT})")
            spec = _spec_from_json(obj.get("spec"), where)
            continue
        request = _parse_request(obj, where, vocab_size)
        if request.id in seen:
            raise TraceError(f"{where}: duplicate request id {request.id!r}")
        if requests and request.arrival_s < requests[-1].arrival_s:
            raise TraceError(f"{where}: arrival_s {request.arrival_s} is earlier than the previous request's; sort by arrival")
        seen.add(request.id)
        requests.append(request)
    if not requests:
        raise TraceError(f"{path}: trace holds no requests")
    return Trace(tuple(requests), spec, source=str(path))
