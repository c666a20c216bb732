#!/usr/bin/env bash
# One-shot GPU check of the Triton MoE experts (at most 7 min 55 s: 20 + 120 + 170 + 100 + 40 s
# of step timeouts, plus 5 s of kill grace each):
#   1. kernel correctness tests on the GPU for real (no interpreter): BF16 and FP8
#      block-scaled experts (tests/kernels/test_fp8_experts.py, W8A16 and W8A8), and one
#      rank's expert moves on a side stream beside a forward pass and under a CUDA graph,
#   2. the wide-EP benchmark table (benchmarks/grouped_gemm.py),
#   3. its FP8 rows (W8A16, W8A8) at EP 8 and 64, vs the BF16 kernel and dense FP8 cuBLAS,
#   4. a quick autotune of two buckets, to prove the command and the JSON it writes.
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
    timeout --kill-after=5 "$seconds" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$OUT/summary.txt"
    tail -n 60 "$OUT/$name.log"
}

step env 20 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); \
print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'; \
$PY -c 'import vllm_wideep.kernels as k; print(k.moe_experts)'"
step tests 120 "$PY" -m pytest tests/kernels -q -p no:cacheprovider -o addopts= \
    --junitxml="$OUT/tests.xml"
step bench 170 "$PY" benchmarks/grouped_gemm.py --json "$OUT/grouped_gemm.json"
step bench_fp8 100 "$PY" benchmarks/grouped_gemm.py --precision fp8 --quick \
    --json "$OUT/grouped_gemm_fp8.json"
step autotune 40 "$PY" -m vllm_wideep.kernels.autotune --search quick --rows 8 512 \
    --output "$OUT/autotune.json"
cat "$OUT/summary.txt"
