#!/usr/bin/env bash
# The GPU check: install from carried wheels (no network), run the CUDA test tier and the step
# benchmarks on CUDA, write everything under $OUT. About 5-8 minutes.
#
#   bash launch/gpu_check.sh --pack   # where the registries are reachable: $WHEELS gets the project's wheel and
#                                     # what the GPU image lacks, built for its Python ($GPU_PYTHON_VERSION, 3.12)
#   bash launch/gpu_check.sh          # on the GPU machine: install, test, benchmark
#
# On a GPU machine without network, carry wheelhouse/ beside the checkout. The check expects a python3
# 3.12 with torch, triton, transformers, pytest and pytest-timeout; megatron-core comes from the wheels.
# Nothing is installed into that python: the wheels go to a folder of their own on PYTHONPATH (a venv
# made from it would not see its torch where that python is itself a venv's).
# Without CUDA it installs, reports and exits 0 having run nothing on a GPU: that is the CPU dry run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # absolute: the report runs from /tmp
WHEELS=${WHEELS:-wheelhouse}
OUT=${OUT:-gpu_check_out}
SITE=${GPU_SITE:-/tmp/dist_memopt_gpu_site}
BUDGET=${BUDGET_SECONDS:-470}  # the whole check stays under 8 minutes
CARRIED=("megatron-core==0.16.1")  # the image's python lacks it; the rest the check needs is there

if [ "${1:-}" = "--pack" ]; then
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    "$PY" -m pip wheel -q --no-deps -w "$WHEELS" .
    "$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "${GPU_PYTHON_VERSION:-3.12}" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${CARRIED[@]}"
    echo "gpu_check: $(du -sh "$WHEELS" | cut -f1) of wheels in $WHEELS/ ($(ls "$WHEELS" | tr '\n' ' ')); carry it beside the checkout"
    exit 0
fi

mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"  # one log and four JSON files
: >"$LOG"
say() { echo "gpu_check: $*" | tee -a "$LOG"; }
START=$(date +%s)
left() { local s=$(( BUDGET - ($(date +%s) - START) )); echo $(( s > 10 ? s : 10 )); }  # timeout 0 would mean none
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    say "no wheels in $WHEELS/: run 'bash launch/gpu_check.sh --pack' where the registries are reachable, and carry $WHEELS/"
    exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl 2>&1 | tee -a "$LOG"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0  # tests/conftest.py sets 1 unless told: the CUDA tier must run the compiled kernels
report=0  # one python start for the report and both verdicts: 3 without CUDA, 4 where the kernels cannot run
(cd /tmp && "$PY" - <<'EOF') 2>&1 | tee -a "$LOG" || report=$?
import sys
import torch, dist_memopt
from dist_memopt.kernels.select import triton_problem
try:
    import triton
    release = triton.__version__
except ImportError:
    release = "not importable"
cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
problem = triton_problem()
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), {cuda}; triton {release}: "
      f"{problem or 'the kernels support it'}; dist_memopt from {dist_memopt.__file__}")
sys.exit(3 if not torch.cuda.is_available() else 4 if problem else 0)
EOF
if [ "$report" = 3 ]; then
    say "no CUDA device visible to $PY (torch.cuda.is_available() is False): installed and reported, nothing run"
    exit 0
elif [ "$report" = 4 ]; then
    say "the Triton kernels cannot run here (above); the CUDA tier and the torch path's timings still run"
elif [ "$report" != 0 ]; then
    say "the report failed (status $report, above): the installed wheels do not import"
    exit "$report"
fi

status=0
# 1. the CUDA tier: fused kernels vs the torch path and the float64 references, FSDP2 on NCCL, Megatron on CUDA
timeout "$(left)" "$PY" -m pytest -q -rs -p no:cacheprovider tests/distributed/test_cuda_kernels.py \
    tests/distributed/test_megatron_cuda.py 2>&1 | tee -a "$LOG" || status=1
# 2. step time against AdamW(fused=True) and AdamW(foreach=True), on CUDA
timeout "$(left)" "$PY" -m dist_memopt.bench step --device cuda --repeats 20 \
    --optimizers AdamW,AdamW-fused,SMMF,SMMF-nocheck,SMMF-triton,SMMF-triton-nocheck,Alada,Alada-triton \
    --json "$OUT/step.json" 2>&1 | tee -a "$LOG" || status=1
# 3. launches and bytes per element of one step, the kernels executed on the GPU
timeout "$(left)" "$PY" -m dist_memopt.bench kernels --kernel-device cuda --kernel-world-sizes "" \
    --json "$OUT/kernels.json" 2>&1 | tee -a "$LOG" || status=1
# 4. both again on bf16 parameters (the kernels load and store bf16 themselves)
HALF=AdamW,AdamW-fused,SMMF-triton,SMMF-triton-nocheck,Alada-triton,Alada-triton-nocheck
timeout "$(left)" "$PY" -m dist_memopt.bench step --device cuda --repeats 20 --step-dtype bfloat16 \
    --optimizers "$HALF" --json "$OUT/step_bf16.json" 2>&1 | tee -a "$LOG" || status=1
timeout "$(left)" "$PY" -m dist_memopt.bench kernels --kernel-device cuda --kernel-world-sizes "" \
    --kernel-dtype bfloat16 --optimizers "$HALF" --json "$OUT/kernels_bf16.json" 2>&1 | tee -a "$LOG" || status=1
say "done in $(( $(date +%s) - START )) s, status $status; results in $OUT/ (the JSON files are result files for docs/results/)"
exit $status
