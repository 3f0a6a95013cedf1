"""Continuous batching on a transformers model, scheduled as vLLM V1 schedules, with the KV cache of a policy.

Each iteration: (1) every running request, in the order it was admitted, gets room for its next token; where the
cache is short (paged) the request at the tail of the running list is preempted until it fits (V1
`Scheduler.schedule`, `self.running.pop()`); (2) only if nothing was preempted, waiting requests are admitted
while the cache has room; (3) the admitted requests are prefilled (together on CUDA) and the others decode one
token in one batched step. The engine owns slots (running requests occupy slots 0..B-1; a finished request's slot
gets the last one, moved), victim order and the step state; the policy stores and selects (strategies/base.py).
Greedy decoding ignores EOS so output lengths are what the trace says. A trace with max_concurrency is replayed as
a client with that many requests in flight: a due request is sent (and its latency counted from) when one finishes.

Out of memory is a result: the engine drops its cache and graphs, empties the allocator and raises KVOutOfMemory
with one line naming the configuration and the bytes asked for, so the next test starts on a clean device.
"""

from __future__ import annotations

import gc
import re
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from pytest_kvcache.engines.decoder import Decoder, PrefillRecord, routed_attention
from pytest_kvcache.errors import KVConfigError, KVOutOfMemory
from pytest_kvcache.metrics import RequestRecord, RunResult
from pytest_kvcache.models import LoadedModel, free_memory_bytes
from pytest_kvcache.strategies.base import KVStrategy, SlotCache
from pytest_kvcache.traces import Request, Trace

PREFILL_TOKENS = 32768  # padded prompt tokens per batched prefill on CUDA (CPU prefills one prompt at a time)


@dataclass
class _Sequence:
    """A request in flight: its record, tokens still to generate, its slot, and a host copy while swapped out."""

    request: Request
    record: RequestRecord
    remaining: int
    slot: int = -1
    saved: object | None = None

    @property
    def tokens(self) -> list[int]:
        return list(self.request.prompt_ids) + self.record.output_ids

    def emit(self, token: int, stamp: float) -> None:
        self.record.output_ids.append(token)
        self.record.token_times_s.append(stamp)
        self.remaining -= 1


def _asked_bytes(error: BaseException) -> str:
    """'2.00 GiB' from torch's 'Tried to allocate 2.00 GiB', else the error's first line."""
    found = re.search(r"Tried to allocate ([\d.]+ \w+)", str(error))
    return found.group(1) if found else str(error).splitlines()[0][:160]


class HFEngine:
    """Replays a trace through a transformers model under one KV strategy (kernels: see Decoder)."""

    name = "hf"

    def __init__(self, model: LoadedModel, strategy: KVStrategy, max_batch: int = 32, kv_limit_bytes: int | None = None,
                 kernels: bool | None = None):
        if max_batch < 1:
            raise KVConfigError(f"max_batch must be >= 1, got {max_batch}")
        if kv_limit_bytes is not None and kv_limit_bytes <= 0:
            raise KVConfigError(f"kv_limit_bytes must be > 0, got {kv_limit_bytes}")
        self.model = model
        self.strategy = strategy
        self.max_batch = max_batch
        self.kv_limit_bytes = kv_limit_bytes
        self.kernels = kernels
        self.cache: SlotCache | None = None
        self.decoder: Decoder | None = None
        self._plan: tuple[int, int, int] | None = None

    # ---------------------------------------------------------------- planning and set-up

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

    def plan_slots(self, trace: Trace) -> tuple[int, int, int]:
        """(slots, tokens per slot, longest context): the KV limit buys as many slots as fit, the strategy sets their
        size. Strategies that do not reserve whole slots (paged, and none, which keeps no KV) get one slot per
        request and apply the limit themselves, if at all."""
        self._check(trace)
        slot_tokens = max(self.strategy.capacity(r) for r in trace.requests)
        context = trace.max_context_tokens
        n_slots = min(self.max_batch, len(trace))
        if self.kv_limit_bytes is not None and self.strategy.reserves_slots:
            slot_bytes = self.strategy.slot_bytes(self.model, slot_tokens, context)
            n_slots = min(n_slots, self.kv_limit_bytes // slot_bytes)
            if n_slots < 1:
                raise KVConfigError(
                    f"kv_limit_bytes={self.kv_limit_bytes} cannot hold one request: {self.strategy.label()} needs "
                    f"{slot_tokens} tokens in {slot_bytes} B; raise the limit or lower the budget"
                )
        return n_slots, slot_tokens, context

    def describe(self, n_slots: int, slot_tokens: int, context: int) -> str:
        need = n_slots * self.strategy.slot_bytes(self.model, slot_tokens, context)
        return (f"model {self.model.name}, strategy {self.strategy.label()}, {n_slots} slots x {slot_tokens} tokens "
                f"({need / 2**30:.2f} GiB of KV)")

    def prepare(self, trace: Trace) -> None:
        """Set up for `trace` now (cache, captured graphs, kernel tuning), so no replay of it pays for that."""
        plan = self.plan_slots(trace)
        self._guarded(plan, lambda: self._setup(*plan))

    def _setup(self, n_slots: int, slot_tokens: int, context: int) -> None:
        """The cache (and on CUDA the captured step graphs) for this plan; the current one is reused while it is at
        least as large in every dimension (a warm-up of a trace's first requests reuses the trace's set-up)."""
        if self._plan is not None and all(have >= need for have, need in zip(self._plan, (n_slots, slot_tokens,
                                                                                          context))):
            self.cache.reset()
            return
        self._release()
        if self.model.device.type == "cuda":
            need = n_slots * self.strategy.slot_bytes(self.model, slot_tokens, context)
            free = free_memory_bytes(self.model.device)
            if need > free:
                raise KVOutOfMemory(f"{self.describe(n_slots, slot_tokens, context)}: needs {need / 2**30:.2f} GiB of KV "
                                    f"storage, {free / 2**30:.2f} GiB free on {self.model.device}")
        self.cache = self.strategy.make_cache(self.model, n_slots, slot_tokens, self.kv_limit_bytes)
        self.decoder = Decoder(self.model, self.cache, self.kernels)
        with routed_attention(self.model):
            self.cache.setup(self.decoder)
        self.decoder.capture(n_slots)
        self._plan = (n_slots, slot_tokens, context)

    def _release(self) -> None:
        """Drop the cache and graphs and give their memory back (also after an out-of-memory error)."""
        self.cache = self.decoder = self._plan = None
        gc.collect()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def _guarded(self, plan: tuple[int, int, int], work: Callable[[], object]) -> object:
        """Run `work`; torch's out-of-memory error becomes KVOutOfMemory after the memory is released."""
        try:
            return work()
        except torch.OutOfMemoryError as error:
            asked = _asked_bytes(error)
        self._release()
        raise KVOutOfMemory(f"{self.describe(*plan)}: out of memory asking for {asked}")

    # ---------------------------------------------------------------- replay

    def run(self, trace: Trace, on_token: Callable[[int], None] | None = None) -> RunResult:
        """Replay the trace in real time; returns per-request records, wall duration and KV counters."""
        plan = self.plan_slots(trace)
        return self._guarded(plan, lambda: self._run(trace, plan, on_token))

    @torch.inference_mode()
    def _run(self, trace: Trace, plan: tuple[int, int, int], on_token) -> RunResult:
        self._setup(*plan)
        cache = self.cache
        pending = deque(sorted(trace.requests, key=lambda r: r.arrival_s))
        waiting: deque[_Sequence] = deque()
        running: list[_Sequence] = []  # admission order: the tail is the next victim
        self.slots: list[_Sequence] = []  # slot order: slots[i] is in slot i
        records: list[RequestRecord] = []
        self.decoder.take_step_times()
        with routed_attention(self.model):
            t0 = time.perf_counter()

            def clock() -> float:
                return time.perf_counter() - t0

            limit = trace.max_concurrency or len(trace)
            while pending or waiting or running:
                now = clock()
                while pending and pending[0].arrival_s <= now and len(waiting) + len(running) < limit:
                    request = pending.popleft()
                    sent = max(request.arrival_s, now) if trace.max_concurrency else request.arrival_s
                    record = RequestRecord(request.id, sent, len(request.prompt_ids))
                    records.append(record)
                    waiting.append(_Sequence(request, record, request.max_new_tokens))
                if not running and not waiting:
                    time.sleep(max(0.0, pending[0].arrival_s - now))
                    continue
                preempted = self._reserve_running(running, waiting)
                decoding = len(running)
                admitted = [] if preempted else self._admit(waiting, running, clock)
                if admitted:
                    self._prefill(admitted, clock, on_token)
                if decoding:
                    self._decode(decoding, clock, on_token)
                self._retire(running)
            duration = clock()
        return RunResult(records, duration, cache.counters, extra=self._extra())

    def _extra(self) -> dict[str, float]:
        """Engine metrics of the run: the paged block peak; on CUDA the decode step time, its roofline fraction and
        the share of host<->device copy time hidden under compute."""
        extra: dict[str, float] = {}
        if hasattr(self.cache, "peak_block_bytes"):
            extra["kv_peak_block_bytes"] = float(self.cache.peak_block_bytes)
        overlap = self.cache.transfers.fraction()
        if overlap is not None:
            extra["transfer_overlap"] = overlap
        steps = self.decoder.take_step_times()
        if steps:
            from pytest_kvcache.engines.roofline import copy_bandwidth, weight_bytes

            weights = weight_bytes(self.model)
            seconds = sum(ms for ms, _ in steps) / 1e3
            read = sum(weights + kv for _, kv in steps)
            extra["decode_step_ms"] = statistics.median(ms for ms, _ in steps)
            extra["roofline_fraction"] = read / seconds / copy_bandwidth(str(self.model.device))
        return extra

    def _reserve_running(self, running: list[_Sequence], waiting: deque) -> bool:
        """V1: each running request (admission order) gets room for its next token, preempting from the tail of the
        running list until it does; returns whether anything was preempted."""
        cache, preempted, i = self.cache, False, 0
        while i < len(running):
            seq = running[i]
            if cache.reserve(seq.slot, cache.kept[seq.slot] + 1):
                i += 1
                continue
            if len(running) == 1:
                raise KVConfigError(
                    f"request {seq.request.id} alone does not fit in the KV memory limit ({self.kv_limit_bytes} B); "
                    "raise kv_limit_bytes"
                )
            victim = running.pop()
            victim.saved = cache.preempt(victim.slot)
            cache.counters.preemptions += 1
            self._free_slot(victim.slot)
            waiting.appendleft(victim)
            preempted = True
            if victim is seq:
                break
        return preempted

    def _admit(self, waiting: deque, running: list, clock: Callable[[], float]) -> list[_Sequence]:
        """Admit waiting requests while the cache has room: swapped ones come back, the others are to be prefilled."""
        cache, admitted = self.cache, []
        while waiting and cache.can_admit(len(running), len(waiting[0].tokens)):
            seq = waiting.popleft()
            seq.slot = len(self.slots)
            self.slots.append(seq)
            running.append(seq)
            if seq.record.scheduled_s is None:
                seq.record.scheduled_s = clock()
            if seq.saved is not None:
                cache.resume(seq.slot, seq.saved)
                seq.saved = None
                continue
            cache.admit(seq.slot, seq.request)
            cache.reserve(seq.slot, len(seq.tokens))  # its blocks are taken now: the next admission sees them gone
            admitted.append(seq)
        return admitted

    def _prefill(self, admitted: list[_Sequence], clock: Callable[[], float], on_token) -> None:
        """Prefill the admitted requests, together on CUDA (in groups of PREFILL_TOKENS padded tokens)."""
        groups: list[list[_Sequence]] = []
        for seq in admitted:
            if groups and self.model.device.type == "cuda":
                group = groups[-1]
                width = max(len(s.tokens) for s in group + [seq])
                if width * (len(group) + 1) <= PREFILL_TOKENS:
                    group.append(seq)
                    continue
            groups.append([seq])
        for group in groups:
            logits = self.decoder.prefill([s.slot for s in group], [s.tokens for s in group])
            tokens = logits.argmax(dim=-1).tolist()
            stamp = clock()
            for seq, token in zip(group, tokens):
                self.cache.finish_prefill(seq.slot, len(seq.tokens))
                seq.emit(token, stamp)
            if on_token:
                on_token(len(group))

    def _decode(self, batch: int, clock: Callable[[], float], on_token) -> None:
        """One batched decode step of slots 0..batch-1 (the requests that were running before this iteration);
        without a cache (strategy `none`) the step is a forward over every request's whole sequence."""
        rows = self.slots[:batch]
        if self.strategy.recomputes:
            logits = self.decoder.prefill(list(range(batch)), [seq.tokens for seq in rows])
            self.cache.advance(batch)
            tokens = logits.argmax(dim=-1).tolist()
        else:
            tokens = self.decoder.decode(batch, [seq.record.output_ids[-1] for seq in rows]).tolist()
        stamp = clock()
        for seq, token in zip(rows, tokens):
            seq.emit(token, stamp)
        if on_token:
            on_token(batch)

    def _free_slot(self, slot: int) -> None:
        """Give up `slot`, moving the request in the last slot into it so slots stay contiguous."""
        last = len(self.slots) - 1
        if slot != last:
            self.cache.move(last, slot)
            self.slots[slot] = self.slots[last]
            self.slots[slot].slot = slot
        self.slots.pop()

    def _retire(self, running: list[_Sequence]) -> None:
        """Release finished requests."""
        for seq in [s for s in running if s.remaining <= 0]:
            running.remove(seq)
            self.cache.release(seq.slot)
            self._free_slot(seq.slot)

    # ---------------------------------------------------------------- one request: teacher forcing, greedy

    def teacher_forced(self, tokens: list[int], prefill_tokens: int,
                       record: PrefillRecord | None = None) -> torch.Tensor:
        """Log-probabilities (n, vocab) float32 of the next token at positions prefill_tokens-1 .. len(tokens)-2:
        the prompt tokens[:prefill_tokens] is prefilled (or taken from `record`, see record_prefill), then
        tokens[prefill_tokens:] are fed one at a time through the policy's cache (teacher forcing), so every row
        reflects what the policy kept at that step."""
        if not 1 <= prefill_tokens < len(tokens):
            raise KVConfigError(f"prefill_tokens must be in [1, {len(tokens) - 1}], got {prefill_tokens}")
        rows = self._single(tokens[:prefill_tokens], tokens[prefill_tokens:-1], len(tokens) - prefill_tokens, record)
        return torch.log_softmax(torch.stack(rows).float(), dim=-1).cpu()

    def greedy(self, prompt: list[int], new_tokens: int, record: PrefillRecord | None = None) -> list[int]:
        """The policy's own greedy continuation of one prompt (free running: each token is fed back)."""
        if new_tokens < 1:
            raise KVConfigError(f"new_tokens must be >= 1, got {new_tokens}")
        rows = self._single(list(prompt), None, new_tokens, record)
        return [int(row.argmax()) for row in rows]

    def _single(self, prompt: list[int], forced: list[int] | None, steps: int,
                record: PrefillRecord | None) -> list[torch.Tensor]:
        """Logits of `steps` next tokens of one request, fed `forced` tokens or its own greedy ones."""
        if record is not None and tuple(prompt) != record.tokens:
            raise KVConfigError("the prefill record is of another prompt")
        request = Request("single", 0.0, tuple(prompt), steps)
        plan = self.plan_slots(Trace((request,)))
        return self._guarded(plan, lambda: self._single_run(prompt, forced, steps, record, request, plan))

    @torch.inference_mode()
    def _single_run(self, prompt, forced, steps, record, request, plan) -> list[torch.Tensor]:
        self._setup(*plan)
        cache = self.cache
        with routed_attention(self.model):
            cache.admit(0, request)
            if record is None:
                rows = [self.decoder.prefill([0], [prompt])[0]]
            else:
                for layer, (q, k, v) in enumerate(record.layers):
                    cache.store_prefill(layer, 0, q, k, v)
                rows = [record.logits]
            cache.finish_prefill(0, len(prompt))
            sequence = list(prompt)
            for i in range(steps - 1):
                token = forced[i] if forced is not None else int(rows[-1].argmax())
                sequence.append(token)
                if self.strategy.recomputes:
                    rows.append(self.decoder.prefill([0], [sequence])[0])
                    cache.advance(1)
                else:
                    rows.append(self.decoder.decode(1, [token], logits=True)[0])
            cache.release(0)
        return rows

    def score(self, tokens: list[int], prefill_tokens: int) -> list[float]:
        """Log-probabilities of tokens[prefill_tokens:] under teacher forcing (see teacher_forced)."""
        logprobs = self.teacher_forced(tokens, prefill_tokens)
        targets = torch.tensor(tokens[prefill_tokens:])
        return logprobs.gather(1, targets[:, None])[:, 0].tolist()
