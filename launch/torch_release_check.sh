#!/usr/bin/env bash
# The whole test suite on another PyTorch release, here on CPU, with the Triton that release pins.
# The README's test command runs torch 2.13.0 (CI); this is how 2.11.0 (the GPU machine's, with its
# Triton 3.6.0), 2.12.1 (Triton 3.7.1) and 2.14.1 (Triton 3.8.0) were checked.
#
#   bash launch/torch_release_check.sh 2.11.0    # PyPI's CUDA build: about 5 GB in its venv, 15 minutes on 2 cores
#
# A virtual environment of its own in $TORCH_CHECK_VENV, with the project's extras as pyproject.toml
# pins them, less the test extra's Triton (torch pins its own) and torchtitan (0.3.0 imports
# torch 2.13's DataParallelMeshDims); numpy < 2.3 for Triton <= 3.6's interpreter. Extra pytest
# arguments follow the version (default: the whole suite).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: bash launch/torch_release_check.sh TORCH_VERSION [pytest args] (e.g. 2.11.0)}
shift
VENV=${TORCH_CHECK_VENV:-/tmp/dist_memopt_torch_$VERSION}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    printf 'torch==%s\nnumpy<2.3\nsetuptools<82\n' "$VERSION" > "$VENV/constraints.txt"
    # the extras' requirements, read from pyproject.toml (one list of pins), less the two above
    "$PY" - > "$VENV/requirements.txt" <<'PYEOF'
import tomllib

extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
for extra in ("deepspeed", "megatron", "mpi", "bench", "hf", "lightning", "test"):
    for requirement in extras[extra]:
        if not requirement.startswith(("triton", "dist-memopt")):
            print(requirement)
PYEOF
    pip_install() { "$VENV/bin/pip" install -q --disable-pip-version-check -c "$VENV/constraints.txt" "$@"; }
    pip_install "torch==$VERSION" "setuptools>=68"
    pip_install -r "$VENV/requirements.txt"
    pip_install --no-deps -e .
fi
# JIT-built extensions (DeepSpeed's shm_comm) of its own: torch's cache is shared by every CUDA build
# of one Python, and another release's build there (or a lock it left) made DeepSpeed's ranks wait
export TORCH_EXTENSIONS_DIR="$VENV/torch_extensions"
"$VENV/bin/python" -c "import torch, triton, numpy; print('torch_release_check:', 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
