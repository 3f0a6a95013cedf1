#!/usr/bin/env bash
# Everything the committed H200 figures come from, in one session on the GPU machine (its own python with CUDA
# torch, offline): the CUDA tests, the GPU suite recording baselines/nvidia-h200/, the decode roofline benchmark
# and what a KV cache buys. Results go to $OUT (default results/h200); each step has its own time limit, so a
# step that runs long still leaves the others' files.
#
#   OUT=/tmp/h200 bash benchmarks/run_h200.sh suite      # the GPU suite: baselines and results (~7 min)
#   OUT=/tmp/h200 bash benchmarks/run_h200.sh figures    # tests and benchmarks (~5 min)
set -uo pipefail
PHASE=${1:-suite}
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

if [ "$PHASE" = suite ]; then  # two sessions, so a slow second one still leaves the first one's baselines
    step gpu-serving 330 $PY -m pytest suites/test_latency.py suites/test_memory.py suites/test_throughput.py \
        --gpu -p no:cacheprovider --kv-update-baselines --kv-baselines "$OUT/baselines" --kv-results "$OUT/serving"
    step gpu-scale 100 $PY -m pytest suites/test_gpu_scale.py suites/test_vllm.py suites/test_quality.py \
        --gpu -p no:cacheprovider -rs --kv-update-baselines --kv-baselines "$OUT/baselines" --kv-results "$OUT/scale"
    tail -n 40 "$OUT/gpu-serving.log" "$OUT/gpu-scale.log"
else
    step gpu-decode 160 $PY benchmarks/gpu_decode.py --out "$OUT/gpu-decode"
    step cache-speedup 45 $PY benchmarks/cache_speedup.py --gpu --out "$OUT/cache-speedup"
    step cuda-tests 70 $PY -m pytest tests/test_cuda.py tests/test_kernels.py -q -p no:cacheprovider
    cat "$OUT/gpu-decode.md" "$OUT/cache-speedup.md" 2>/dev/null
    tail -n 15 "$OUT/cuda-tests.log"
fi
cat "$OUT/steps.txt"
tar -czf "$OUT-$PHASE.tar.gz" -C "$(dirname "$OUT")" "$(basename "$OUT")"
