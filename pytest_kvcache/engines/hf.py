"""Continuous batching on a transformers model, with the KV cache owned by the strategy's slot storage.

Each iteration admits the requests that have arrived while free slots (the KV memory limit) allow, prefills each
new one, then runs one batched decode step for every running request, stamping every token as it is produced.
Greedy decoding ignores EOS so output lengths are what the trace says.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from transformers import AttentionInterface

from pytest_kvcache.errors import KVConfigError
from pytest_kvcache.metrics import RequestRecord, RunResult
from pytest_kvcache.models import LoadedModel
from pytest_kvcache.strategies.base import KVStrategy, SlotCache
from pytest_kvcache.traces import Request, Trace

ATTENTION_NAME = "pytest_kvcache"


def kv_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, kv_step=None, **kwargs):
    """transformers attention function: hands q/k/v of one layer to the strategy's cache (prefill or decode)."""
    cache, slot = kv_step
    if slot is None:
        out = cache.decode(module.layer_idx, query, key, value, scaling)
    else:
        out = cache.prefill(module.layer_idx, slot, query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, kv_attention)


@contextmanager
def strategy_attention(model: LoadedModel) -> Iterator[None]:
    """Route the model's attention through kv_attention for the duration of a run, then restore it."""
    previous = model.config._attn_implementation
    model.model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.model.set_attn_implementation(previous)


@dataclass
class _Sequence:
    """A request in flight: its record, tokens still to generate, and a host copy while swapped out."""

    request: Request
    record: RequestRecord
    remaining: int
    saved: object | None = None

    @property
    def tokens(self) -> list[int]:
        return list(self.request.prompt_ids) + self.record.output_ids

    def emit(self, token: int, stamp: float) -> None:
        self.record.output_ids.append(token)
        self.record.token_times_s.append(stamp)
        self.remaining -= 1


class HFEngine:
    """Replays a trace through a transformers model under one KV strategy."""

    def __init__(self, model: LoadedModel, strategy: KVStrategy, max_batch: int = 32, kv_limit_bytes: int | None = None):
        if max_batch < 1:
            raise KVConfigError(f"max_batch must be >= 1, got {max_batch}")
        if kv_limit_bytes is not None and kv_limit_bytes <= 0:
            raise KVConfigError(f"kv_limit_bytes must be > 0, got {kv_limit_bytes}")
        self.model = model
        self.strategy = strategy
        self.max_batch = max_batch
        self.kv_limit_bytes = kv_limit_bytes
        self.cache: SlotCache | None = None

    def _check(self, trace: Trace) -> None:
        max_pos = self.model.config.max_position_embeddings
        for r in trace.requests:
            if r.context_tokens > max_pos:
                raise KVConfigError(
                    f"request {r.id}: {r.context_tokens} tokens exceed model {self.model.name!r}'s {max_pos} positions"
                )
            if max(r.prompt_ids) >= self.model.vocab_size:
                raise KVConfigError(
                    f"request {r.id}: token id {max(r.prompt_ids)} >= vocab size {self.model.vocab_size} of {self.model.name!r}"
                )

    def plan_slots(self, trace: Trace) -> tuple[int, int]:
        """(slots, tokens per slot): the KV limit buys as many slots as fit, the strategy sets their size.
        Strategies that do not reserve whole slots (paged) get one slot per request and apply the limit themselves."""
        self._check(trace)
        slot_tokens = max(self.strategy.capacity(r) for r in trace.requests)
        n_slots = min(self.max_batch, len(trace))
        if self.kv_limit_bytes is not None and self.strategy.reserves_slots:
            slot_bytes = self.strategy.slot_bytes(self.model, slot_tokens)
            n_slots = min(n_slots, self.kv_limit_bytes // slot_bytes)
            if n_slots < 1:
                raise KVConfigError(
                    f"kv_limit_bytes={self.kv_limit_bytes} cannot hold one request: {self.strategy.label()} needs "
                    f"{slot_tokens} tokens in {slot_bytes} B; raise the limit or lower the budget"
                )
        return n_slots, slot_tokens

    def _logits(self, ids: torch.Tensor, slot: int | None) -> torch.Tensor:
        """Last-position logits (B, vocab) of one forward through the strategy's cache (slot None = decode)."""
        positions = torch.zeros_like(ids)
        out = self.model.model(
            input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1, kv_step=(self.cache, slot)
        )
        return out.logits[:, -1]

    def _forward(self, ids: torch.Tensor, slot: int | None) -> torch.Tensor:
        return self._logits(ids, slot).argmax(dim=-1)

    @torch.inference_mode()
    def score(self, tokens: list[int], prefill_tokens: int) -> list[float]:
        """Log-probabilities of tokens[prefill_tokens:], fed one at a time through the strategy's cache
        (teacher forcing), so perplexity reflects what the policy kept at every step."""
        if not 1 <= prefill_tokens < len(tokens):
            raise KVConfigError(f"prefill_tokens must be in [1, {len(tokens) - 1}], got {prefill_tokens}")
        request = Request("score", 0.0, tuple(tokens[:prefill_tokens]), len(tokens) - prefill_tokens)
        self._check(Trace((request,)))
        self.cache = self.strategy.make_cache(self.model, 1, self.strategy.capacity(request))
        cache, device = self.cache, self.model.device
        with strategy_attention(self.model):
            hooks = cache.attach(self.model)
            try:
                cache.admit(0, request)
                logits = self._logits(torch.tensor([tokens[:prefill_tokens]], device=device), 0)
                cache.finish_prefill(0, prefill_tokens)
                scores = [float(torch.log_softmax(logits.float(), dim=-1)[0, tokens[prefill_tokens]])]
                for position in range(prefill_tokens, len(tokens) - 1):
                    cache.begin_decode(1)
                    logits = self._logits(torch.tensor([[tokens[position]]], device=device), None)
                    cache.finish_decode()
                    scores.append(float(torch.log_softmax(logits.float(), dim=-1)[0, tokens[position + 1]]))
                cache.release(0)
            finally:
                for hook in hooks:
                    hook.remove()
        return scores

    @torch.inference_mode()
    def run(self, trace: Trace, on_token: Callable[[int], None] | None = None) -> RunResult:
        """Replay the trace in real time; returns per-request records, wall duration and KV counters."""
        n_slots, slot_tokens = self.plan_slots(trace)
        self.cache = self.strategy.make_cache(self.model, n_slots, slot_tokens, self.kv_limit_bytes)
        cache = self.cache
        pending = deque(sorted(trace.requests, key=lambda r: r.arrival_s))
        waiting: deque[_Sequence] = deque()
        running: list[_Sequence] = []
        records: list[RequestRecord] = []
        with strategy_attention(self.model):
            hooks = cache.attach(self.model)
            t0 = time.perf_counter()

            def clock() -> float:
                return time.perf_counter() - t0

            try:
                while pending or waiting or running:
                    now = clock()
                    while pending and pending[0].arrival_s <= now:
                        request = pending.popleft()
                        record = RequestRecord(request.id, request.arrival_s, len(request.prompt_ids))
                        records.append(record)
                        waiting.append(_Sequence(request, record, request.max_new_tokens))
                    if not running and not waiting:
                        time.sleep(max(0.0, pending[0].arrival_s - now))
                        continue
                    self._admit(waiting, running, clock, on_token)
                    if running:
                        self._preempt_for_room(waiting, running)
                    if running:
                        self._decode(running, clock, on_token)
                duration = clock()
            finally:
                for hook in hooks:
                    hook.remove()
        return RunResult(records, duration, cache.counters)

    def _admit(self, waiting: deque, running: list, clock: Callable[[], float], on_token) -> None:
        """Admit waiting requests while the cache has room: swapped ones come back, others are (re)prefilled."""
        cache = self.cache
        while waiting and cache.can_admit(len(running), len(waiting[0].tokens)):
            seq = waiting.popleft()
            slot = len(running)
            running.append(seq)
            if seq.record.scheduled_s is None:
                seq.record.scheduled_s = clock()
            if seq.saved is not None:
                cache.resume(slot, seq.saved)
                seq.saved = None
                continue
            tokens = seq.tokens
            cache.admit(slot, seq.request)
            token = int(self._forward(torch.tensor([tokens], device=self.model.device), slot)[0])
            cache.finish_prefill(slot, len(tokens))
            seq.emit(token, clock())
            if on_token:
                on_token(1)
            self._retire(running)

    def _preempt_for_room(self, waiting: deque, running: list) -> None:
        """Preempt the latest-arrived running requests until the next decode step fits (vLLM's policy)."""
        while self.cache.make_room(len(running)) > 0:
            if len(running) == 1:
                raise KVConfigError(
                    f"request {running[0].request.id} alone does not fit in the KV memory limit "
                    f"({self.kv_limit_bytes} B); raise kv_limit_bytes"
                )
            victim = max(range(len(running)), key=lambda i: (running[i].request.arrival_s, i))
            seq = running[victim]
            seq.saved = self.cache.preempt(victim)
            self.cache.counters.preemptions += 1
            self._remove(running, victim)
            waiting.appendleft(seq)

    def _decode(self, running: list, clock: Callable[[], float], on_token) -> None:
        cache = self.cache
        cache.begin_decode(len(running))
        ids = torch.tensor([[seq.record.output_ids[-1]] for seq in running], device=self.model.device)
        tokens = self._forward(ids, None).tolist()
        cache.finish_decode()
        stamp = clock()
        for seq, token in zip(running, tokens):
            seq.emit(token, stamp)
        if on_token:
            on_token(len(running))
        self._retire(running)

    def _remove(self, running: list, i: int) -> None:
        """Drop running[i], moving the last running request into its slot so slots stay contiguous."""
        last = len(running) - 1
        if i != last:
            self.cache.move(last, i)
            running[i] = running[last]
        running.pop()

    def _retire(self, running: list) -> None:
        """Release finished requests."""
        i = 0
        while i < len(running):
            if running[i].remaining > 0:
                i += 1
                continue
            self.cache.release(i)
            self._remove(running, i)
