#!/usr/bin/env bash
# Check the fused kernels on another Triton release, here on CPU: the kernel tests in that release's
# interpreter, then every kernel compiled for sm_90 by it. The README's test command runs the test
# extra's release (3.9.0); this is how 3.6.0 (torch 2.11's pin, and the GPU machine's) was checked.
#
#   bash launch/triton_release_check.sh 3.6.0    # about 6 minutes on 2 cores; needs the package registry
#
# A virtual environment of its own (torch 2.13.0 CPU, that triton) in $TRITON_CHECK_VENV; the repo is
# imported from the checkout. Triton <= 3.6's interpreter needs numpy < 2.3 (numpy 2.4 refuses to read
# its one-element arguments as scalars); that is the interpreter's limit, not the compiled kernels'.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: bash launch/triton_release_check.sh TRITON_VERSION (e.g. 3.6.0)}
VENV=${TRITON_CHECK_VENV:-/tmp/dist_memopt_triton_$VERSION}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0 "triton==$VERSION" "numpy<2.3" pytest pytest-timeout pyyaml tqdm transformers==5.24.0
fi
export PYTHONPATH="$PWD"
"$VENV/bin/python" -c "import torch, triton, numpy; print('triton_release_check:', 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
# the kernels' tests (interpreted; conftest.py sets TRITON_INTERPRET=1) and the sharded ones on gloo
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -W ignore tests/test_triton_kernels.py tests/test_kernel_runs.py \
    tests/test_step_cost.py tests/test_host_syncs.py tests/distributed/test_triton_sharded.py
# compiled for an H200 by this release (TRITON_INTERPRET unset): errors, spills, atomics, loop costs
env -u TRITON_INTERPRET "$VENV/bin/python" -m tools.compile_kernels --models awkward,gpt2 --archs 90
