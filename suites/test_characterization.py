"""The characterization study (marker `sweep`, opt-in: `make characterize`): which strategy wins under which load,
model size, KV budget and prompt length, and the request rate each one sustains under an SLO (its capacity).

Loads are Poisson arrivals and bursty gamma arrivals with fluctuating prompt lengths (shape 0.25, lengths +-75%:
the condition the study credits to InfiniGen). Models: tiny (random weights) and SmolLM2-135M on CPU, the 1B and 8B
shapes on GPU. `kvbench report RESULTS -o DIR` turns the results into the study's tables, plots and verdicts.
"""

import math

import pytest

from pytest_kvcache.metrics import SLO

pytestmark = pytest.mark.sweep

SMALL_MODELS = dict(cpu=("tiny",), gpu=("llama-1b",))
LARGE_MODELS = dict(cpu=("smollm2",), gpu=("llama-8b",))
BUDGET = 0.2
INFINIGEN = "infinigen:budget={},track_recall=0"
LOAD_STRATEGIES = ["full", "none", f"streaming:budget={BUDGET}", f"h2o:budget={BUDGET}", INFINIGEN.format(BUDGET),
                   "quantized:bits=4", "paged", "vllm"]
ARRIVALS = {"poisson": dict(burstiness=1.0, range_ratio=0.25), "bursty": dict(burstiness=0.25, range_ratio=0.75)}
RATES = [8.0, 32.0, 128.0]
LOW_RATE = RATES[0]
BUDGETS = [0.1, 0.2, 0.5, 1.0]
BUDGET_STRATEGIES = ["full", "none", "quantized:bits=2", "quantized:bits=4", "paged", "paged:preempt=swap",
                     *(f"{name}:budget={b}" for name in ("streaming", "h2o") for b in BUDGETS),
                     *(INFINIGEN.format(b) for b in BUDGETS if b < 1)]  # infinigen at 1.0 is fetch_all=1: not a budget
PROMPT_LENGTHS = [128, 512, 1536]
CAPACITY_STRATEGIES = ["full", f"streaming:budget={BUDGET}", f"h2o:budget={BUDGET}", INFINIGEN.format(BUDGET),
                       "quantized:bits=4", "paged"]
REQUESTS_IN_LIMIT = [2, 8]  # KV memory limits, in full-cache requests of the longest context
PROMPT, OUTPUT = 128, 32


# Interactive targets per model and device, what a user of each would call acceptable: TTFT and TPOT (p90 for the
# capacity search, per request for goodput).
SLOS = {"tiny": SLO(ttft_ms=500.0, tpot_ms=40.0), "smollm2": SLO(ttft_ms=3000.0, tpot_ms=400.0),
        "llama-1b": SLO(ttft_ms=200.0, tpot_ms=20.0), "llama-8b": SLO(ttft_ms=1000.0, tpot_ms=100.0)}


def slo_for(model) -> SLO:
    return SLOS[model.name]


def _check(measurement, trace):
    assert measurement.summary("output_tokens") == sum(r.max_new_tokens for r in trace.requests)


def _load(kv_bench, kv_model, kv_strategy, request_trace, arrival, rate, num_requests):
    trace = request_trace(model=kv_model, rate=rate, num_requests=num_requests, prompt_len=PROMPT, output_len=OUTPUT,
                          seed=3, **ARRIVALS[arrival])
    _check(kv_bench(trace, kv_model, kv_strategy, slo=slo_for(kv_model),
                    extra_config={"study": "load", "arrival": arrival}), trace)


@pytest.mark.kv_models(**SMALL_MODELS)
@pytest.mark.kv_strategies(*LOAD_STRATEGIES)
@pytest.mark.parametrize("arrival", list(ARRIVALS))
@pytest.mark.parametrize("rate", RATES, ids=[f"rate{r:g}" for r in RATES])
def test_load(kv_bench, kv_model, kv_strategy, request_trace, arrival, rate):
    _load(kv_bench, kv_model, kv_strategy, request_trace, arrival, rate, num_requests=12)


@pytest.mark.kv_models(**LARGE_MODELS)
@pytest.mark.kv_strategies("full", f"streaming:budget={BUDGET}", f"h2o:budget={BUDGET}", "vllm")
def test_load_large_model(kv_bench, kv_model, kv_strategy, request_trace):
    """The larger model at the low rate, Poisson (the study's claim for vLLM); a third of the requests on CPU, where a
    round of SmolLM2 takes seconds."""
    _load(kv_bench, kv_model, kv_strategy, request_trace, "poisson", LOW_RATE,
          num_requests=12 if kv_model.device.type == "cuda" else 4)


@pytest.mark.kv_models(**SMALL_MODELS)
@pytest.mark.kv_strategies(*BUDGET_STRATEGIES)
def test_budget(kv_bench, kv_model, kv_strategy, request_trace):
    trace = request_trace(model=kv_model, rate=math.inf, num_requests=16, prompt_len=256, output_len=48,
                          range_ratio=0.25, seed=4)
    limit = 4 * trace.max_context_tokens * kv_model.kv_bytes_per_token
    _check(kv_bench(trace, kv_model, kv_strategy, kv_limit_bytes=limit, slo=slo_for(kv_model),
                    extra_config={"study": "budget"}), trace)


@pytest.mark.kv_models(**SMALL_MODELS)
@pytest.mark.kv_strategies("full", f"streaming:budget={BUDGET}", f"h2o:budget={BUDGET}", INFINIGEN.format(BUDGET))
@pytest.mark.parametrize("prompt_len", PROMPT_LENGTHS, ids=[f"prompt{n}" for n in PROMPT_LENGTHS])
def test_prompt_length(kv_bench, kv_model, kv_strategy, request_trace, prompt_len):
    trace = request_trace(model=kv_model, rate=math.inf, num_requests=8, prompt_len=prompt_len, output_len=OUTPUT,
                          seed=5)
    _check(kv_bench(trace, kv_model, kv_strategy, slo=slo_for(kv_model),
                    extra_config={"study": "prompt_length", "prompt_len": prompt_len}), trace)


@pytest.mark.kv_models(**SMALL_MODELS)
@pytest.mark.kv_strategies(*CAPACITY_STRATEGIES)
@pytest.mark.parametrize("requests_in_limit", REQUESTS_IN_LIMIT, ids=[f"limit{n}" for n in REQUESTS_IN_LIMIT])
def test_capacity(kv_bench, kv_model, kv_strategy, request_trace, requests_in_limit):
    def trace_at(rate):
        return request_trace(model=kv_model, rate=rate, num_requests=16, prompt_len=PROMPT, output_len=OUTPUT,
                             range_ratio=0.25, seed=6)

    limit = requests_in_limit * trace_at(1.0).max_context_tokens * kv_model.kv_bytes_per_token
    measurement = kv_bench.capacity(trace_at, kv_model, kv_strategy, low=8.0, high=512.0, bisections=2,
                                    kv_limit_bytes=limit, slo=slo_for(kv_model),
                                    extra_config={"requests_in_limit": requests_in_limit})
    probes = measurement.info["capacity_probes"]
    capacity = measurement.summary("capacity_rps")
    assert all(p["meets_slo"] for p in probes if p["rate"] <= capacity)
    assert capacity == 0 or any(p["rate"] == capacity for p in probes)
