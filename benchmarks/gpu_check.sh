#!/usr/bin/env bash
# One-shot GPU check of the Triton MoE experts (at most 6 min 45 s: 30 + 150 + 180 + 45 s of step timeouts):
#   1. kernel correctness tests on the GPU for real (no interpreter), and one rank's expert
#      moves on a side stream beside a forward pass and under a CUDA graph,
#   2. the wide-EP benchmark table (benchmarks/grouped_gemm.py),
#   3. a quick autotune of two buckets, to prove the command and the JSON it writes.
# Logs and JSON go to $OUT (default ./out). Every step has a timeout and a failure does not
# stop the next step. Needs python3 with torch + triton and a CUDA GPU; no vLLM, no network.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
set -x
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
OUT="${OUT:-$PWD/out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"

step() {  # step NAME SECONDS CMD...: run with a timeout, log to $OUT/NAME.log, record rc
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$OUT/summary.txt"
    tail -n 60 "$OUT/$name.log"
}

step env 30 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); \
print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'; \
$PY -c 'import vllm_wideep.kernels as k; print(k.moe_experts)'"
step tests 150 "$PY" -m pytest tests/kernels -q -p no:cacheprovider -o addopts= \
    --junitxml="$OUT/tests.xml"
step bench 180 "$PY" benchmarks/grouped_gemm.py --json "$OUT/grouped_gemm.json"
step autotune 45 "$PY" -m vllm_wideep.kernels.autotune --search quick --rows 8 512 \
    --output "$OUT/autotune.json"
cat "$OUT/summary.txt"
