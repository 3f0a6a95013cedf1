"""A process that owns one vLLM AsyncLLM engine and replays traces through it on request.

Run as `python -m pytest_kvcache.engines.vllm_worker`; it reads JSON lines on stdin ({"engine_args": ...} first,
then {"trace": [...]} per replay, then {"stop": true}) and answers one JSON line each on the original stdout.
Everything vLLM prints goes to stderr, so the protocol stays clean. The engine runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0): startup errors arrive as the real exception, and no grandchildren exist.
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


async def _one(engine, request: dict, t0: float, record: dict, harness: list[float]) -> None:
    """Submit one request at its arrival time and stamp every streamed token on this process's clock."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    delay = t0 + request["arrival_s"] - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    params = SamplingParams(temperature=0, max_tokens=request["max_new_tokens"], ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.DELTA)
    record["scheduled_s"] = time.perf_counter() - t0
    stream = engine.generate(TokensPrompt(prompt_token_ids=request["prompt_ids"]), params, request["id"])
    async for out in stream:
        start = time.perf_counter()
        tokens = out.outputs[0].token_ids
        record["output_ids"].extend(tokens)
        record["token_times_s"].extend([start - t0] * len(tokens))
        harness[0] += time.perf_counter() - start


async def _replay(engine, trace: list[dict]) -> dict:
    before = _counters()
    records = {r["id"]: {"output_ids": [], "token_times_s": [], "scheduled_s": None} for r in trace}
    harness = [0.0]
    t0 = time.perf_counter()
    await asyncio.gather(*(_one(engine, r, t0, records[r["id"]], harness) for r in trace))
    duration = time.perf_counter() - t0
    await asyncio.sleep(0.05)
    after = _counters()
    return {"records": records, "duration_s": duration, "harness_s": harness[0],
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
    started = time.perf_counter()
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**setup["engine_args"]))
    except BaseException as e:  # noqa: BLE001 - any startup failure is reported to the parent, then we exit
        traceback.print_exc()
        reply({"ok": False, "error": _root_cause(e)})
        return
    reply({"ok": True, "startup_s": time.perf_counter() - started})
    try:
        for message in lines:
            if message.get("stop"):
                break
            reply({"ok": True, **await _replay(engine, message["trace"])})
    finally:
        engine.shutdown()
        del engine


if __name__ == "__main__":
    asyncio.run(main())
