#!/usr/bin/env bash
# The GPU check, for the day a CUDA machine is lent: install from carried wheels (no network), run the
# CUDA test tier and the step benchmarks on CUDA, write everything under $OUT. About 5-8 minutes.
#
#   bash launch/gpu_check.sh --pack   # on a connected machine: fill $WHEELS with the project's wheel
#                                     # and its test dependencies (not torch/triton: the GPU machine has them)
#   bash launch/gpu_check.sh          # on the GPU machine: check, install, test, benchmark
#
# Without CUDA (or without triton) it says so and exits 0 having run nothing: that is the CPU dry run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-wheelhouse}
OUT=${OUT:-gpu_check_out}
VENV=${GPU_VENV:-.venv-gpu}
BUDGET=${BUDGET_SECONDS:-470}  # the whole check stays under 8 minutes
EXTRA=(pytest pytest-timeout pyyaml tqdm numpy "transformers>=4.40" "megatron-core==0.16.1")

if [ "${1:-}" = "--pack" ]; then
    mkdir -p "$WHEELS"
    "$PY" -m pip wheel --no-deps -w "$WHEELS" .
    "$PY" -m pip download -d "$WHEELS" "${EXTRA[@]}"
    echo "gpu_check: wheels for the GPU machine are in $WHEELS/ (carry it beside the checkout)"
    exit 0
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False): skipped, nothing run"
    exit 0
fi
if ! "$PY" -c "import triton" 2>/dev/null; then
    echo "gpu_check: triton is not importable by $PY: skipped (the fused kernels need it)"
    exit 0
fi
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
mkdir -p "$OUT"
# torch and triton come from the machine; the rest from the carried wheels, offline
"$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install --quiet --no-index --find-links "$WHEELS" "${EXTRA[@]}" dist-memopt
"$VENV/bin/python" -c "import torch, triton, dist_memopt as d; print('gpu_check:', torch.__version__, triton.__version__, torch.cuda.get_device_name(), d.__file__)" | tee "$OUT/environment.txt"

status=0
# 1. the CUDA tier: fused kernels vs the torch path and the float64 references, FSDP2 on NCCL, Megatron on CUDA
timeout "$(left)" "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/distributed/test_cuda_kernels.py \
    tests/distributed/test_megatron_cuda.py 2>&1 | tee "$OUT/tests.txt" || status=1
# 2. step time against AdamW(fused=True) and AdamW(foreach=True), on CUDA
timeout "$(left)" "$VENV/bin/python" -m dist_memopt.bench step --device cuda --repeats 20 \
    --optimizers AdamW,AdamW-fused,SMMF,SMMF-nocheck,SMMF-triton,SMMF-triton-nocheck,Alada,Alada-triton \
    --json "$OUT/step.json" 2>&1 | tee "$OUT/step.txt" || status=1
# 3. launches and bytes per element of one step, the kernels executed on the GPU
timeout "$(left)" "$VENV/bin/python" -m dist_memopt.bench kernels --kernel-device cuda --kernel-world-sizes "" \
    --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt" || status=1
# 4. both again on bf16 parameters (the kernels load and store bf16 themselves)
HALF=AdamW,AdamW-fused,SMMF-triton,SMMF-triton-nocheck,Alada-triton,Alada-triton-nocheck
timeout "$(left)" "$VENV/bin/python" -m dist_memopt.bench step --device cuda --repeats 20 --step-dtype bfloat16 \
    --optimizers "$HALF" --json "$OUT/step_bf16.json" 2>&1 | tee "$OUT/step_bf16.txt" || status=1
timeout "$(left)" "$VENV/bin/python" -m dist_memopt.bench kernels --kernel-device cuda --kernel-world-sizes "" \
    --kernel-dtype bfloat16 --optimizers "$HALF" --json "$OUT/kernels_bf16.json" 2>&1 | tee "$OUT/kernels_bf16.txt" || status=1
echo "gpu_check: done in $(( $(date +%s) - START )) s, status $status; results in $OUT/ (record them in README.md)"
exit $status
