"""The hf engine: greedy outputs equal transformers' own generate, batching changes nothing, limits are checked."""

import math

import pytest
import torch

from pytest_kvcache.engines.hf import HFEngine
from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.models import load_model
from pytest_kvcache.strategies import parse_strategy
from pytest_kvcache.traces import Request, Trace, TraceSpec, synthetic


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def trace_of(tiny, num_requests=4, prompt_len=40, output_len=10, range_ratio=0.3, rate=math.inf, seed=21):
    return synthetic(TraceSpec(num_requests=num_requests, rate=rate, prompt_len=prompt_len, output_len=output_len,
                               range_ratio=range_ratio, vocab_size=tiny.vocab_size, seed=seed))


@torch.no_grad()
def generate(tiny, request):
    """transformers' greedy decoding of one request with its default attention and DynamicCache."""
    ids = torch.tensor([request.prompt_ids])
    out = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=request.max_new_tokens, min_new_tokens=request.max_new_tokens)
    return out[0, ids.shape[1]:].tolist()


def test_one_request_equals_transformers_generate(tiny):
    """The engine's own attention, RoPE and slot cache reproduce transformers' greedy tokens exactly."""
    trace = trace_of(tiny, num_requests=1, prompt_len=48, output_len=16, range_ratio=0.0)
    request = trace.requests[0]
    result = HFEngine(tiny, parse_strategy("full")).run(trace)
    tokens = result.records[0].output_ids
    assert len(set(tokens)) > 5, "degenerate output would make the comparison vacuous"
    assert tokens == generate(tiny, request)


@pytest.mark.parametrize("max_batch", [8, 2], ids=["all-at-once", "queue-and-reuse-slots"])
def test_continuous_batching_does_not_change_tokens(tiny, max_batch):
    """Requests of different lengths decoded together (slots freed and moved mid-run) give each one's solo output."""
    trace = trace_of(tiny, num_requests=5)
    assert len({r.max_new_tokens for r in trace.requests}) > 1
    result = HFEngine(tiny, parse_strategy("full"), max_batch=max_batch).run(trace)
    got = {r.id: r.output_ids for r in result.records}
    assert sorted(got) == sorted(r.id for r in trace.requests)
    for request in trace.requests:
        assert got[request.id] == generate(tiny, request), request.id


def test_records_follow_the_trace(tiny):
    """Every request yields exactly max_new_tokens tokens (EOS ignored) with ordered timestamps after arrival."""
    trace = trace_of(tiny, num_requests=4, rate=400.0, output_len=6)
    result = HFEngine(tiny, parse_strategy("full")).run(trace)
    by_id = {r.id: r for r in result.records}
    for request in trace.requests:
        record = by_id[request.id]
        assert record.success and record.error is None
        assert record.arrival_s == request.arrival_s
        assert record.prompt_tokens == len(request.prompt_ids)
        assert record.output_tokens == len(record.token_times_s) == request.max_new_tokens
        assert record.scheduled_s >= request.arrival_s
        assert record.token_times_s[0] >= record.scheduled_s
        assert record.token_times_s == sorted(record.token_times_s)
    assert result.duration_s >= max(r.token_times_s[-1] for r in result.records)


def test_full_cache_counters_are_exact(tiny):
    """Full cache: every fed token stored and kept, none evicted, peak = all requests resident together."""
    trace = trace_of(tiny, num_requests=3, range_ratio=0.0)
    result = HFEngine(tiny, parse_strategy("full")).run(trace)
    stored = sum(len(r.prompt_ids) + r.max_new_tokens - 1 for r in trace.requests)
    c = result.counters
    assert (c.tokens_stored, c.tokens_kept_final, c.tokens_evicted, c.resident_bytes) == (stored, stored, 0, 0)
    assert c.peak_resident_bytes == stored * tiny.kv_bytes_per_token


def test_kv_bytes_per_token_of_tiny():
    """K and V, 4 layers, 2 KV heads of 32 dims, float32: the unit every memory figure is built on."""
    assert load_model("tiny").kv_bytes_per_token == 2 * 4 * 2 * 32 * 4


def test_kv_limit_too_small_names_the_bytes_needed(tiny):
    """A limit that cannot hold one request is a config error that says how much one request needs."""
    trace = trace_of(tiny, num_requests=2, prompt_len=40, output_len=10, range_ratio=0.0)
    need = 50 * tiny.kv_bytes_per_token
    engine = HFEngine(tiny, parse_strategy("full"), kv_limit_bytes=need - 1)
    with pytest.raises(KVConfigError) as info:
        engine.run(trace)
    message = str(info.value)
    assert f"kv_limit_bytes={need - 1} cannot hold one request" in message
    assert f"{need} B" in message
    assert "\n" not in message
    streaming_need = 20 * tiny.kv_bytes_per_token
    HFEngine(tiny, parse_strategy("streaming:budget=20"), kv_limit_bytes=streaming_need).plan_slots(trace)
    with pytest.raises(KVConfigError, match=f"{streaming_need} B"):
        HFEngine(tiny, parse_strategy("streaming:budget=20"), kv_limit_bytes=streaming_need - 1).plan_slots(trace)


def test_a_kv_limit_does_not_bound_none(tiny):
    """`none` keeps no KV, so any KV limit admits every request at once (it used to divide by its 0-byte slot)."""
    trace = trace_of(tiny, num_requests=3, prompt_len=40, output_len=10, range_ratio=0.0)
    assert HFEngine(tiny, parse_strategy("none"), kv_limit_bytes=1).plan_slots(trace)[0] == 3


def test_kv_limit_caps_resident_bytes_and_keeps_outputs(tiny):
    """Under a limit of two requests' KV, four requests queue, never exceed it, and decode the same tokens."""
    trace = trace_of(tiny, num_requests=4, range_ratio=0.0)
    limit = 2 * trace.max_context_tokens * tiny.kv_bytes_per_token
    limited = HFEngine(tiny, parse_strategy("full"), kv_limit_bytes=limit).run(trace)
    free = HFEngine(tiny, parse_strategy("full")).run(trace)
    assert limited.counters.peak_resident_bytes <= limit < free.counters.peak_resident_bytes
    assert {r.id: r.output_ids for r in limited.records} == {r.id: r.output_ids for r in free.records}


@pytest.mark.parametrize("kwargs,words", [
    (dict(max_batch=0), "max_batch must be >= 1, got 0"),
    (dict(kv_limit_bytes=0), "kv_limit_bytes must be > 0, got 0"),
])
def test_bad_engine_settings(tiny, kwargs, words):
    """Nonsense settings fail at construction with the setting named."""
    with pytest.raises(KVConfigError, match=words):
        HFEngine(tiny, parse_strategy("full"), **kwargs)


def test_token_beyond_vocab_is_refused_before_running(tiny):
    """A trace made for a bigger vocabulary fails with the request named, not an index error in torch."""
    trace = Trace((Request("big", 0.0, (5, tiny.vocab_size), 2),))
    with pytest.raises(KVConfigError, match=f"request big: token id {tiny.vocab_size} >= vocab size"):
        HFEngine(tiny, parse_strategy("full")).run(trace)


def test_context_beyond_model_positions_is_refused(tiny):
    """Requests longer than the model's positions are refused up front."""
    positions = tiny.config.max_position_embeddings
    trace = Trace((Request("long", 0.0, (5,) * 10, positions),))
    with pytest.raises(KVConfigError, match=f"request long: {positions + 10} tokens exceed"):
        HFEngine(tiny, parse_strategy("full")).run(trace)


def test_run_restores_the_models_attention(tiny):
    """The engine routes attention through the cache only during a run; afterwards generate() is untouched."""
    before = tiny.config._attn_implementation
    HFEngine(tiny, parse_strategy("streaming:budget=16")).run(trace_of(tiny, num_requests=1, output_len=3))
    assert tiny.config._attn_implementation == before


def test_out_of_memory_is_a_one_line_result_and_the_engine_recovers(tiny, monkeypatch):
    """An allocation failure mid-run (injected: the third decode step) becomes KVOutOfMemory naming the configuration
    and the bytes asked for; the cache is dropped, and the next run decodes what a fresh engine decodes."""
    from pytest_kvcache.engines.decoder import Decoder
    from pytest_kvcache.errors import KVOutOfMemory

    trace = trace_of(tiny, num_requests=3, output_len=6)
    expected = [r.output_ids for r in HFEngine(tiny, parse_strategy("full")).run(trace).records]
    engine = HFEngine(tiny, parse_strategy("full"))
    original, steps = Decoder.decode, []

    def failing(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ...")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Decoder, "decode", failing)
    with pytest.raises(KVOutOfMemory) as info:
        engine.run(trace)
    message = str(info.value)
    assert "\n" not in message
    assert "model tiny, strategy full, 3 slots" in message and "asking for 2.00 GiB" in message
    assert engine.cache is None and engine.decoder is None
    monkeypatch.setattr(Decoder, "decode", original)
    assert [r.output_ids for r in engine.run(trace).records] == expected


def test_closed_loop_keeps_at_most_max_concurrency_in_flight(tiny):
    """A client limit of 2 with every request due at t=0: never more than 2 in flight, each request is sent when
    one finishes (its latency counts from then), and the tokens are the open-loop replay's."""
    spec = TraceSpec(num_requests=5, rate=math.inf, prompt_len=30, output_len=6, vocab_size=tiny.vocab_size, seed=2)
    closed = synthetic(TraceSpec(**{**spec.__dict__, "max_concurrency": 2}))
    result = HFEngine(tiny, parse_strategy("full")).run(closed)
    spans = [(r.arrival_s, r.token_times_s[-1]) for r in result.records]
    for t, _ in spans:
        assert sum(start <= t < end for start, end in spans) <= 2
    assert sorted(r.arrival_s for r in result.records)[2] >= min(end for _, end in spans)
    open_loop = HFEngine(tiny, parse_strategy("full")).run(synthetic(spec))
    assert [r.output_ids for r in result.records] == [r.output_ids for r in open_loop.records]
    with pytest.raises(KVConfigError, match="max_concurrency must be >= 0"):
        TraceSpec(max_concurrency=-1)
