#!/usr/bin/env bash
# Everything the committed H200 figures come from, in one session on the GPU machine (its own python with CUDA
# torch, offline): the CUDA tests, the GPU suite recording baselines/nvidia-h200/, the decode roofline benchmark
# and what a KV cache buys. Results go to $OUT (default results/h200); each step has its own time limit, so a
# step that runs long still leaves the others' files.
#
#   OUT=/tmp/h200 bash benchmarks/run_h200.sh serving    # tiny + llama-1b serving suites: baselines, results (~8 min)
#   OUT=/tmp/h200 bash benchmarks/run_h200.sh scale      # llama-8b suite, then the decode benchmarks (~8 min)
#   OUT=/tmp/h200 bash benchmarks/run_h200.sh study      # throughput baselines, then the characterization sweep (~9 min)
#   OUT=/tmp/h200 bash benchmarks/run_h200.sh rest       # llama-1b throughput baselines merged into the committed
#                                                        # file, then the sweep's budget/prompt/capacity studies (~9 min)
#   OUT=/tmp/h200 bash benchmarks/run_h200.sh tune       # decode benchmarks, CUDA tests, step profiles (~9 min)
#   OUT=/tmp/h200 bash benchmarks/run_h200.sh sweep-rest # the sweep's prompt-length and capacity studies (~5 min)
#   PLANT=10 OUT=/tmp/h200 bash benchmarks/run_h200.sh compare   # kvbench compare HEAD HEAD --gpu of the smoke
#                                                        # selection's tests matching COMPARE_K (default tiny),
#                                                        # PAIRS pairs (default 12), the head's decode step planted
#                                                        # PLANT% slower (0: A/A); its compare.json and markdown
#                                                        # land in $OUT (limit COMPARE_LIMIT, default 560 s)
#   OUT=/tmp/h200 bash benchmarks/run_h200.sh all        # the whole GPU suite (`pytest suites/ --gpu`) in one
#                                                        # session, timed, re-recording every baseline it runs
#                                                        # into a copy of baselines/nvidia-h200/ (limit 570 s)
#
# Baselines and results are written as each test finishes, so a step cut off by its limit keeps what it measured.
set -uo pipefail
PHASE=${1:-serving}
case $PHASE in
serving | scale | study | rest | tune | sweep-rest | compare | all) ;;
*) echo "run_h200.sh: unknown phase '$PHASE' (serving, scale, study, rest, tune, sweep-rest, compare, all)" >&2; exit 2 ;;
esac
OUT=${OUT:-results/h200}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${GPU_PYTHON:-python3}
$PY -c "import importlib.metadata as m; m.distribution('pytest-kvcache')" 2>/dev/null ||
    $PY -m pip install --quiet --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1

step() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}

suite() {  # name, seconds, pytest arguments...
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" $PY -m pytest "$@" --gpu -p no:cacheprovider -rs --durations=0 --kv-update-baselines \
        --kv-baselines "$OUT/baselines" --kv-results "$OUT/$name"
    tail -n 60 "$OUT/$name.log"
}

if [ "$PHASE" = serving ]; then
    suite gpu-serving 540 suites/test_latency.py suites/test_memory.py suites/test_throughput.py
elif [ "$PHASE" = study ]; then
    suite gpu-throughput 120 suites/test_throughput.py
    step gpu-characterization 390 $PY -m pytest suites/test_characterization.py -m sweep --gpu -p no:cacheprovider -rs \
        --durations=0 --kv-results "$OUT/characterization"
    tail -n 30 "$OUT/gpu-characterization.log"
elif [ "$PHASE" = rest ]; then
    mkdir -p "$OUT/baselines" && cp -r baselines/nvidia-h200 "$OUT/baselines/"  # merged into: keeps tiny's entries
    suite gpu-throughput-1b 230 suites/test_throughput.py -k llama-1b
    step characterization 320 $PY -m pytest suites/test_characterization.py -m sweep --gpu -p no:cacheprovider -rs \
        --durations=0 -k "test_budget or test_prompt_length or test_capacity" --kv-results "$OUT/characterization"
    tail -n 40 "$OUT/characterization.log"
elif [ "$PHASE" = all ]; then
    mkdir -p "$OUT/baselines" && cp -r baselines/nvidia-h200 "$OUT/baselines/"  # entries of tests it does not reach stay
    suite gpu-all "${ALL_LIMIT:-570}" suites/
elif [ "$PHASE" = tune ]; then
    step gpu-decode 240 $PY benchmarks/gpu_decode.py --out "$OUT/gpu-decode"
    step cuda-tests 200 $PY -m pytest tests/test_cuda.py tests/test_kernels.py -q -p no:cacheprovider --durations=10
    step gpu-profile 100 $PY benchmarks/gpu_decode.py --only profile --out "$OUT/gpu-profile"
    cat "$OUT/gpu-decode.md" 2>/dev/null || tail -n 30 "$OUT/gpu-decode.log"
    tail -n 25 "$OUT/cuda-tests.log"
    grep -h "^## Profile" "$OUT/gpu-profile.md" 2>/dev/null
elif [ "$PHASE" = compare ]; then
    [ -d .git ] || { git init -q && git add -A && git -c user.name=kv -c user.email=kv@localhost commit -qm tree; }
    PLANT=${PLANT:-0}
    runs=$(mktemp -d)  # compare's own folder holds every session's log: more files than a device call brings back
    step "compare-s$PLANT" "${COMPARE_LIMIT:-560}" $PY -m pytest_kvcache.cli compare HEAD HEAD --gpu \
        --pairs "${PAIRS:-12}" --max-pairs "${PAIRS:-12}" --head-env "KVBENCH_PLANT_SLOWDOWN=$(awk "BEGIN {print $PLANT / 100}")" --output "$runs" \
        --markdown "$OUT/compare-s$PLANT.md" -- suites/test_decode.py -m smoke -k "${COMPARE_K:-tiny}" --kv-rounds 10 \
        -p benchmarks.plant_slowdown
    cp "$runs/compare.json" "$OUT/compare-s$PLANT.json" 2>/dev/null
    cat "$OUT/compare-s$PLANT.md" 2>/dev/null || tail -n 20 "$OUT/compare-s$PLANT.log"
elif [ "$PHASE" = sweep-rest ]; then
    step characterization-rest "${SWEEP_LIMIT:-300}" $PY -m pytest suites/test_characterization.py -m sweep --gpu \
        -p no:cacheprovider -rs --durations=0 -k "${SWEEP_K:-test_prompt_length or test_capacity}" \
        --kv-results "$OUT/characterization"
    tail -n 40 "$OUT/characterization-rest.log"
elif [ "$PHASE" = scale ]; then
    suite gpu-scale 200 suites/test_gpu_scale.py suites/test_vllm.py suites/test_quality.py
    step gpu-decode 200 $PY benchmarks/gpu_decode.py --out "$OUT/gpu-decode"
    step cache-speedup 45 $PY benchmarks/cache_speedup.py --gpu --out "$OUT/cache-speedup"
    step cuda-tests 70 $PY -m pytest tests/test_cuda.py tests/test_kernels.py -q -p no:cacheprovider
    cat "$OUT/gpu-decode.md" "$OUT/cache-speedup.md" 2>/dev/null
    tail -n 15 "$OUT/cuda-tests.log"
fi
cat "$OUT/steps.txt"
