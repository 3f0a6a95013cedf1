"""A process that owns one vLLM AsyncLLM engine and replays traces through it on request.

Run as `python -m pytest_kvcache.engines.vllm_worker`; it reads JSON lines on stdin ({"engine_args": ...} first,
then {"trace": [...]} per replay, then {"stop": true}) and answers one JSON line each on the original stdout.
Everything vLLM prints goes to stderr, so the protocol stays clean. AsyncLLM always runs its EngineCore in a child
process (vLLM has no in-process async engine), so the parent reaps this worker's children when it stops it; end of
stdin also stops the engine. VLLM_ENABLE_V1_MULTIPROCESSING stays at vLLM's default: on CPU, 0 swaps the executor
for the in-process one, which vLLM says cannot bind OpenMP threads (measured: 7 s faster start, ~6% fewer tok/s).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback

COUNTERS = ("vllm:num_preemptions", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits")


def _counters() -> dict[str, float]:
    from vllm.v1.metrics.reader import Counter, get_metrics_snapshot

    totals = dict.fromkeys(COUNTERS, 0.0)
    for metric in get_metrics_snapshot():
        if isinstance(metric, Counter) and metric.name in totals:
            totals[metric.name] += metric.value
    return totals


def _peak_usage_logger(peak: list[float]):
    """A vLLM stat logger keeping the highest KV-cache usage of any scheduler step in peak[0] (vLLM's own gauge
    holds only the last step, which is 0 once a run is over)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class PeakUsage(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                peak[0] = max(peak[0], scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self) -> None:
            pass

    return PeakUsage


async def _one(engine, request: dict, t0: float, record: dict, harness: list[float],
               slots: asyncio.Semaphore | None) -> None:
    """Submit one request at its arrival time (when a client slot is free, with max_concurrency) and stamp every
    streamed token on this process's monotonic clock (the clock vLLM's EngineCore stamps scheduling with)."""
    delay = t0 + request["arrival_s"] - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    if slots is None:
        await _stream(engine, request, t0, record, harness)
        return
    async with slots:
        record["arrival_s"] = time.monotonic() - t0
        await _stream(engine, request, t0, record, harness)


async def _stream(engine, request: dict, t0: float, record: dict, harness: list[float]) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    start = time.monotonic()
    params = SamplingParams(temperature=0, max_tokens=request["max_new_tokens"], ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.DELTA)
    stream = engine.generate(TokensPrompt(prompt_token_ids=request["prompt_ids"]), params, request["id"])
    harness[0] += time.monotonic() - start
    try:
        async for out in stream:
            start = time.monotonic()
            tokens = out.outputs[0].token_ids
            record["output_ids"].extend(tokens)
            record["token_times_s"].extend([start - t0] * len(tokens))
            if out.metrics is not None and out.metrics.scheduled_ts > 0:
                record["scheduled_s"] = out.metrics.scheduled_ts - t0
            harness[0] += time.monotonic() - start
    except Exception as e:  # noqa: BLE001 - a failed request is data, as in vLLM's benchmark; the run goes on
        record["error"] = _root_cause(e)


async def _replay(engine, trace: list[dict], peak: list[float], max_concurrency: int = 0) -> dict:
    """One timed replay from a cold prefix cache, so every round measures the trace's own sharing; with
    max_concurrency the client keeps at most that many requests in flight (records then carry the send time)."""
    await engine.reset_prefix_cache()
    before = _counters()
    records = {r["id"]: {"output_ids": [], "token_times_s": [], "scheduled_s": None, "error": None} for r in trace}
    harness = [0.0]
    peak[0] = 0.0
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    t0 = time.monotonic()
    await asyncio.gather(*(_one(engine, r, t0, records[r["id"]], harness, slots) for r in trace))
    duration = time.monotonic() - t0
    await asyncio.sleep(0.05)
    after = _counters()
    return {"records": records, "duration_s": duration, "harness_s": harness[0], "kv_cache_usage": peak[0],
            "counters": {name: after[name] - before[name] for name in COUNTERS}}


def _root_cause(error: BaseException) -> str:
    """The innermost exception's one-line message (vLLM wraps the cause that says what to fix)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


async def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    reply = lambda data: protocol.write(json.dumps(data) + "\n")  # noqa: E731 - one-line protocol writer
    lines = (json.loads(line) for line in sys.stdin)
    setup = next(lines)
    started = time.monotonic()
    peak = [0.0]
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**setup["engine_args"]),
                                           stat_loggers=[_peak_usage_logger(peak)])
    except BaseException as e:  # noqa: BLE001 - any startup failure is reported to the parent, then we exit
        traceback.print_exc()
        reply({"ok": False, "error": _root_cause(e)})
        return
    reply({"ok": True, "startup_s": time.monotonic() - started})
    try:
        for message in lines:
            if message.get("stop"):
                break
            reply({"ok": True, **await _replay(engine, message["trace"], peak, message.get("max_concurrency", 0))})
    finally:
        engine.shutdown()
        del engine


if __name__ == "__main__":
    asyncio.run(main())
