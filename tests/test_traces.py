"""Traces: seeded synthetic generation, arrival processes, JSONL round trip and the errors bad files give."""

import json
import math

import numpy as np
import pytest

from pytest_kvcache.traces import Request, Trace, TraceError, TraceSpec, load_jsonl, save_jsonl, synthetic

SMALL = dict(num_requests=12, rate=8.0, prompt_len=16, output_len=4, range_ratio=0.5, vocab_size=100)


def test_same_spec_and_seed_give_the_same_trace(tmp_path):
    """Every machine must replay the same requests, or baselines compare different workloads."""
    a, b = synthetic(TraceSpec(seed=7, **SMALL)), synthetic(TraceSpec(seed=7, **SMALL))
    assert a == b
    save_jsonl(a, tmp_path / "a.jsonl")
    save_jsonl(b, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_different_seed_gives_a_different_trace():
    """The seed must reach every random draw, or two 'different' traces are the same workload."""
    a, b = synthetic(TraceSpec(seed=1, **SMALL)), synthetic(TraceSpec(seed=2, **SMALL))
    assert [r.arrival_s for r in a.requests] != [r.arrival_s for r in b.requests]
    assert [r.prompt_ids for r in a.requests] != [r.prompt_ids for r in b.requests]


def test_lengths_ids_and_shared_prefix_follow_the_spec():
    """Prompt/output lengths stay in their range, ids avoid special tokens, the shared prefix is shared."""
    spec = TraceSpec(num_requests=50, prompt_len=20, output_len=10, range_ratio=0.5, shared_prefix_len=6,
                     vocab_size=64, seed=3)
    trace = synthetic(spec)
    assert len(trace) == 50
    assert {len(r.prompt_ids) for r in trace.requests} <= set(range(10, 31))
    assert {r.max_new_tokens for r in trace.requests} <= set(range(5, 16))
    assert len({len(r.prompt_ids) for r in trace.requests}) > 3
    assert all(4 <= t < 64 for r in trace.requests for t in r.prompt_ids)
    assert len({r.prompt_ids[:6] for r in trace.requests}) == 1
    assert len({r.prompt_ids[6:] for r in trace.requests}) == 50
    assert [r.id for r in trace.requests] == [f"r{i}" for i in range(50)]


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0], ids=["poisson", "gamma-bursty", "gamma-regular"])
def test_mean_gap_is_one_over_rate(burstiness):
    """Arrival gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)): their mean must be 1/rate."""
    rate, n = 5.0, 4000
    trace = synthetic(TraceSpec(num_requests=n, rate=rate, burstiness=burstiness, prompt_len=1, output_len=1, seed=11))
    arrivals = np.array([r.arrival_s for r in trace.requests])
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0.0
    assert np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.08)
    # gamma variance is shape*scale^2 = 1/(rate^2*burstiness): the coefficient of variation tells the shapes apart
    cv = gaps.std() / gaps.mean()
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.15)


def test_infinite_rate_puts_every_arrival_at_zero():
    """rate=inf is the offline (all-at-once) workload the memory and throughput suites use."""
    trace = synthetic(TraceSpec(num_requests=9, rate=math.inf, prompt_len=4, output_len=2))
    assert [r.arrival_s for r in trace.requests] == [0.0] * 9


@pytest.mark.parametrize("field,value,words", [
    ("num_requests", 0, "num_requests"),
    ("rate", 0.0, "rate"),
    ("burstiness", -1.0, "burstiness"),
    ("prompt_len", 0, "prompt_len"),
    ("range_ratio", 1.0, "range_ratio"),
    ("shared_prefix_len", 200, "shared_prefix_len"),
    ("vocab_size", 1, "vocab_size"),
])
def test_bad_spec_raises_trace_error(field, value, words):
    """A spec that cannot generate a trace is refused up front with the parameter named."""
    with pytest.raises(TraceError, match=words):
        TraceSpec(**{field: value})


def test_head_is_warmup_with_all_arrivals_at_zero():
    """Warm-up replays the first requests at once; it must not change their prompts."""
    trace = synthetic(TraceSpec(seed=5, **SMALL))
    head = trace.head(3)
    assert [r.arrival_s for r in head.requests] == [0.0, 0.0, 0.0]
    assert [r.prompt_ids for r in head.requests] == [r.prompt_ids for r in trace.requests[:3]]


def test_save_then_load_round_trips(tmp_path):
    """A saved trace must load back equal, spec included, so --kv-trace replays what was saved."""
    trace = synthetic(TraceSpec(seed=9, **SMALL))
    path = tmp_path / "trace.jsonl"
    save_jsonl(trace, path)
    loaded = load_jsonl(path, vocab_size=100)
    assert loaded == trace
    assert loaded.spec == trace.spec
    assert loaded.source == str(path)


def test_saved_trace_is_strict_json(tmp_path):
    """Trace files are read by other tools (jq, vLLM's replayer): no NaN/Infinity literals, even for rate=inf."""
    trace = synthetic(TraceSpec(num_requests=2, rate=math.inf, prompt_len=4, output_len=2))
    path = tmp_path / "offline.jsonl"
    save_jsonl(trace, path)

    def refuse(literal):
        raise ValueError(f"non-standard JSON literal {literal}")

    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=refuse)
    assert load_jsonl(path) == trace


def test_interrupted_save_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    """save_jsonl claims to write atomically: an interrupt keeps the old file and leaves no temp file behind."""
    path = tmp_path / "trace.jsonl"
    save_jsonl(synthetic(TraceSpec(seed=1, **SMALL)), path)
    before = path.read_bytes()
    real_write = type(path).write_text

    def write_half(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(type(path), "write_text", write_half)
    with pytest.raises(KeyboardInterrupt):
        save_jsonl(synthetic(TraceSpec(seed=2, **SMALL)), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.jsonl"]


GOOD = {"id": "a", "arrival_s": 0.0, "prompt_ids": [5, 6, 7], "max_new_tokens": 4}


def _line(**changes):
    obj = {k: v for k, v in {**GOOD, **changes}.items() if v is not ...}
    return json.dumps(obj)


@pytest.mark.parametrize("bad_line,words", [
    ('{"id": "b", "arrival_s": 0.5,', "not valid JSON"),
    (_line(id="b", max_new_tokens=...), "missing field 'max_new_tokens'"),
    (_line(id="b", arrival_s="soon"), "field 'arrival_s' must be a number"),
    (_line(id="b", max_new_tokens=2.5), "field 'max_new_tokens' must be an integer"),
    (_line(id="b", prompt_ids="5 6 7"), "field 'prompt_ids' must be a list"),
    (_line(id="b", prompt_ids=[5, "x"]), "'prompt_ids' must hold integer token ids"),
    (_line(id="b", prompt_ids=[]), "'prompt_ids' must be a non-empty list"),
    (_line(id="b", arrival_s=-1.0), "'arrival_s' must be a finite number >= 0"),
    (_line(id="b", max_new_tokens=-3), "'max_new_tokens' must be an integer >= 1"),
    (_line(id="b", max_new_tokens=0), "'max_new_tokens' must be an integer >= 1"),
    (_line(), "duplicate request id 'a'"),
    ('[1, 2, 3]', "expected a JSON object"),
], ids=["invalid-json", "missing-field", "arrival-type", "max-new-type", "prompt-type", "token-type",
        "empty-prompt", "negative-arrival", "negative-max-new", "zero-max-new", "duplicate-id", "not-an-object"])
def test_bad_request_line_names_file_and_line(tmp_path, bad_line, words):
    """A bad trace line must be found without reading the file by hand: path, line number and the problem."""
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), bad_line]) + "\n")
    with pytest.raises(TraceError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert f"{path}:2:" in message
    assert words in message
    assert "\n" not in message


def test_unsorted_arrivals_name_file_and_line(tmp_path):
    """Replays admit in file order: an arrival earlier than the previous one is refused, not reordered silently."""
    path = tmp_path / "unsorted.jsonl"
    lines = [_line(id="a", arrival_s=1.0), _line(id="b", arrival_s=2.0), _line(id="c", arrival_s=1.5)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=rf"{path}:3: arrival_s 1.5 is earlier"):
        load_jsonl(path)


def test_token_id_beyond_vocab_names_file_and_line(tmp_path):
    """A token id the model cannot embed would crash deep in torch; the loader names it instead."""
    path = tmp_path / "vocab.jsonl"
    path.write_text(_line(prompt_ids=[5, 100, 7]) + "\n")
    assert load_jsonl(path, vocab_size=101).requests[0].prompt_ids == (5, 100, 7)
    with pytest.raises(TraceError, match=rf"{path}:1: .*< 100, found 100"):
        load_jsonl(path, vocab_size=100)


def test_blank_lines_are_skipped_and_numbering_is_kept(tmp_path):
    """Line numbers in messages must be the editor's line numbers, blank lines counted."""
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n".join([_line(), "", "   ", _line(id="b", max_new_tokens=0)]) + "\n")
    with pytest.raises(TraceError, match=rf"{path}:4:"):
        load_jsonl(path)


@pytest.mark.parametrize("text", ["", "\n\n", json.dumps({"trace_format": 1, "spec": None}) + "\n"],
                         ids=["empty", "blank-lines", "header-only"])
def test_trace_without_requests_names_the_file(tmp_path, text):
    """An empty trace would make every metric NaN; refuse it and say which file."""
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(TraceError, match=rf"{path}: trace holds no requests"):
        load_jsonl(path)


def test_missing_file_is_a_trace_error(tmp_path):
    """A mistyped --kv-trace path is a usage problem, not an OSError traceback."""
    with pytest.raises(TraceError, match="cannot read trace file .*nosuch.jsonl"):
        load_jsonl(tmp_path / "nosuch.jsonl")


def test_unsupported_trace_format_names_file_and_line(tmp_path):
    """A trace from a newer version is refused with its line, not misread."""
    path = tmp_path / "future.jsonl"
    path.write_text(json.dumps({"trace_format": 99, "spec": None}) + "\n" + _line() + "\n")
    with pytest.raises(TraceError, match=rf"{path}:1: trace_format 99 is not supported"):
        load_jsonl(path)


@pytest.mark.parametrize("spec", [{"nosuch": 1}, {"num_requests": 0}], ids=["unknown-key", "invalid-value"])
def test_bad_header_spec_names_file_and_line(tmp_path, spec):
    """A hand-edited header must give a TraceError with path and line like any other bad line."""
    path = tmp_path / "header.jsonl"
    path.write_text(json.dumps({"trace_format": 1, "spec": spec}) + "\n" + _line() + "\n")
    with pytest.raises(TraceError) as info:
        load_jsonl(path)
    assert f"{path}:1:" in str(info.value)


def test_hand_written_trace_describes_its_source(tmp_path):
    """Results record where a replayed trace came from."""
    path = tmp_path / "hand.jsonl"
    path.write_text(_line() + "\n")
    trace = load_jsonl(path)
    assert trace == Trace((Request("a", 0.0, (5, 6, 7), 4),), None)
    assert trace.describe() == {"source": str(path), "num_requests": 1}
    assert trace.max_context_tokens == 7
