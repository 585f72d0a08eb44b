#!/usr/bin/env bash
# Creates ./.venv with everything the project, its tests and its benchmarks need.
# torch is pinned to the CPU wheel this machine carries first: an unpinned torch would pull CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install --upgrade pip
pip_install "torch==${TORCH_VERSION:-2.13.0}"
pip_install -e ".[all]"
"$VENV/bin/python" -c "import torch, dist_memopt; print(f'environment ready: torch {torch.__version__}, dist_memopt {dist_memopt.__version__}')"
